"""Warmup throughput versus the object store's own, measured in the same run.

    python benchmarks/bench_warmup.py [--size-mib 1024] [--shards 4] [--concurrency 8]
                                      [--rounds 3] [--out bench-storage.json]

Starts real MinIO + Redis, formats a JuiceFS volume, publishes a random model
with `sidecar.publish`, GETs every block object once (so MinIO serves from
its page cache from then on), then per round, each with a fresh mount and an
empty cache dir:
- raw: every block object GET straight from MinIO with `--concurrency`
  parallel SigV4-signed requests (what the store gives without JuiceFS/FUSE);
- sidecar: the sidecar's own JuiceFSMount + Streamer (reads, sha256, cache);
- juicefs warmup: `juicefs warmup` (JuiceFS 1.x, its defaults) on the same
  mount flags, which fills the cache without verifying anything.
Each is reported as the median MB/s over the rounds and as a ratio to raw.
Needs root and /dev/fuse; the minio/juicefs binaries come from hack/build-binaries.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from devcluster.juicefs import wait_cached
from devcluster.s3 import read_objects
from devcluster.storage import MIB, StorageStack
from sidecar.env import Settings
from sidecar.manifest import Manifest, read_manifest
from sidecar.mount import JuiceFSMount
from sidecar.warmup import Streamer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench-storage.json"
NAME, VERSION = "bench", "v1"


def say(message: str) -> None:
    print(f"[bench-warmup {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def sidecar_pass(settings: Settings, manifest: Manifest) -> dict[str, Any]:
    """The sidecar's warmup on a fresh mount and cache: MB/s as the pod would see it."""
    mount = JuiceFSMount(settings)
    await mount.start()
    try:
        streamer = Streamer(
            root=mount.models_dir,
            concurrency=settings.warmup_concurrency,
            deadline=time.monotonic() + settings.warmup_timeout_seconds,
            on_progress=lambda p: None,
            on_error=lambda p, e: None,
        )
        progress = await streamer.run(read_manifest(mount.bento_dir).select(settings.models))
        cached = await asyncio.to_thread(wait_cached, settings.cache_dir, manifest.total_bytes)
    finally:
        await mount.stop()
    return {
        "mb_per_s": progress.mb_per_s,
        "seconds": progress.elapsed,
        "retries": progress.retries,
        "cached_bytes": cached,
    }


async def juicefs_warmup_pass(
    stack: StorageStack, settings: Settings, manifest: Manifest
) -> dict[str, Any]:
    """`juicefs warmup` (defaults) of the Bento's models on a fresh sidecar-like mount."""
    mount = JuiceFSMount(settings)
    await mount.start()
    try:
        started = time.perf_counter()
        await asyncio.to_thread(stack.juicefs.warmup, [mount.models_dir])
        seconds = time.perf_counter() - started
        cached = await asyncio.to_thread(wait_cached, settings.cache_dir, manifest.total_bytes)
    finally:
        await mount.stop()
    return {
        "mb_per_s": manifest.total_bytes / MIB / seconds,
        "seconds": seconds,
        "cached_bytes": cached,
    }


def raw_pass(stack: StorageStack, keys: list[str], concurrency: int) -> dict[str, Any]:
    raw = read_objects(stack.store.s3, stack.store.bucket, keys, concurrency)
    return {"mb_per_s": raw.mb_per_s, "seconds": raw.seconds, "bytes": raw.bytes}


def summarize(runs: list[dict[str, Any]], raw_mb_per_s: float | None) -> dict[str, Any]:
    rates = [r["mb_per_s"] for r in runs]
    median = statistics.median(rates)
    summary: dict[str, Any] = {
        "mb_per_s": round(median, 1),
        "runs_mb_per_s": [round(r, 1) for r in rates],
        "seconds": [round(r["seconds"], 2) for r in runs],
    }
    for key in ("cached_bytes", "retries"):
        if key in runs[0]:
            summary[key] = [r[key] for r in runs]
    if raw_mb_per_s:
        summary["vs_raw"] = round(median / raw_mb_per_s, 3)
    return summary


async def bench(size_mib: int, shards: int, concurrency: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-warmup-") as tmp:
        work = Path(tmp)
        with StorageStack(work / "storage") as stack:
            version = stack.juicefs.run("version").strip()
            manifest = stack.publish_random(
                work, NAME, VERSION, [size_mib * MIB // shards] * shards
            )
            keys = stack.block_keys(manifest, NAME, VERSION)
            say(f"published {manifest.total_bytes / MIB:.0f} MiB in {len(keys)} objects; {version}")
            raw_pass(stack, keys, concurrency)  # pre-read: MinIO's page cache, not its disk
            runs: dict[str, list[dict[str, Any]]] = {"raw": [], "sidecar": [], "juicefs": []}

            def fresh(label: str, round_: int) -> Settings:
                pod = work / f"{label}-{round_}"
                base = stack.sidecar_settings(pod, NAME, VERSION)
                return replace(
                    base,
                    warmup_concurrency=concurrency,
                    cache_size_mib=max(4096, 2 * size_mib),
                )

            def done(label: str, run: dict[str, Any], settings: Settings | None) -> None:
                runs[label].append(run)
                say(f"round {len(runs[label])} {label}: {run['mb_per_s']:.0f} MB/s")
                if settings is not None:
                    shutil.rmtree(settings.cache_dir, ignore_errors=True)

            for round_ in range(1, rounds + 1):
                done("raw", raw_pass(stack, keys, concurrency), None)
                settings = fresh("sidecar", round_)
                done("sidecar", await sidecar_pass(settings, manifest), settings)
                settings = fresh("juicefs", round_)
                done("juicefs", await juicefs_warmup_pass(stack, settings, manifest), settings)
    raw = summarize(runs["raw"], None)
    return {
        "what": "sidecar warmup and `juicefs warmup` (fresh mount, empty cache) vs raw GETs",
        "juicefs": version,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "kernel": platform.release(),
        },
        "model_bytes": manifest.total_bytes,
        "model_files": len(manifest.files),
        "block_objects": len(keys),
        "concurrency": concurrency,
        "rounds": rounds,
        "raw_object_store": raw,
        "sidecar_warmup": summarize(runs["sidecar"], raw["mb_per_s"]),
        "juicefs_warmup_defaults": summarize(runs["juicefs"], raw["mb_per_s"]),
    }


def describe(record: dict[str, Any], out: Path) -> str:
    lines = [
        f"{record['model_bytes'] / MIB:.0f} MiB model, {record['block_objects']} objects, "
        f"median of {record['rounds']} rounds, {record['juicefs']}:",
    ]
    for label, key in (
        (f"raw parallel GETs ({record['concurrency']} connections)", "raw_object_store"),
        (f"sidecar warmup ({record['concurrency']} reads, sha256)", "sidecar_warmup"),
        ("juicefs warmup (defaults)", "juicefs_warmup_defaults"),
    ):
        line = record[key]
        ratio = line.get("vs_raw", 1.0)
        lines.append(f"  {label:<36} {line['mb_per_s']:>8} MB/s  {ratio:.2f} of raw")
    lines.append(f"written to {out}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("needs root and /dev/fuse (a real FUSE mount)", file=sys.stderr)
        return 2
    record = asyncio.run(bench(args.size_mib, args.shards, args.concurrency, args.rounds))
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(describe(record, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
