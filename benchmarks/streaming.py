"""Streaming: the sidecar's warmup against raw GETs, `juicefs warmup` and `cat`, same run.

One model (default 2 GiB in 4 shards) published into JuiceFS 1.4.2 over a
MinIO behind a shaped link (`benchmarks.store`); then, for each link profile
(200 MB/s, 100 MB/s, 200 MB/s + 30 ms first-byte latency) and each round,
each method on a fresh mount with an empty cache:

- raw: GET every block object of the model once, `--raw-connections` at a time
  (what the store gives without JuiceFS, FUSE or hashing: the limit);
- sidecar: the sidecar's own `JuiceFSMount` + `Streamer` (reads, sha256 of
  every file against the manifest, cache filled), as a pod runs it;
- juicefs warmup: `juicefs warmup` with its defaults on the same mount flags
  (fills the cache, verifies nothing), and the sha256 pass a user would need
  after it to trust the bytes (`juicefs warmup + verify`);
- cat: a naive single reader, `cat` of each file in load order.

Each line: MiB/s, the ratio to raw, and MinIO's own GET and byte counts for
the pass (GETs per block object shows over-fetching).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.record import MIB, median, new_record, say
from benchmarks.store import ShapedStorage
from devcluster.juicefs import wait_cached
from devcluster.s3 import read_objects
from devcluster.storage import write_random_model
from devcluster.storemetrics import StoreRequests
from devcluster.storenet import LinkProfile
from modelstore.manifest import Manifest, read_manifest
from modelstore.mount import JuiceFSMount
from modelstore.publish import publish
from modelstore.streamer import stream_model
from sidecar.env import Settings

SCENARIO = "streaming"
NAME, VERSION = "bench-streaming", "v1"
PROFILES = (LinkProfile(200), LinkProfile(100), LinkProfile(200, delay_ms=30))
METHODS = ("raw", "sidecar", "juicefs_warmup", "juicefs_warmup_verify", "cat")
LABELS = {
    "raw": "raw parallel GETs of the model's blocks",
    "sidecar": "sidecar warmup (verified)",
    "juicefs_warmup": "juicefs warmup (defaults, unverified)",
    "juicefs_warmup_verify": "juicefs warmup + sha256 pass",
    "cat": "cat, one reader",
}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as handle:
        while chunk := handle.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


class Passes:
    """The methods, each on a fresh mount and cache of the published model."""

    def __init__(self, storage: ShapedStorage, work: Path, manifest: Manifest, keys: list[str]):
        self.storage = storage
        self.work = work
        self.manifest = manifest
        self.keys = keys
        self.count = 0

    def settings(self) -> Settings:
        self.count += 1
        base = self.storage.stack.sidecar_settings(self.work / f"pass-{self.count}", NAME, VERSION)
        return replace(base, cache_size_mib=max(8192, 2 * self.manifest.total_bytes // MIB))

    async def mounted(
        self, settings: Settings, body: Callable[[JuiceFSMount], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        mount = JuiceFSMount(settings.mount_spec())
        started = time.perf_counter()
        await mount.start()
        mounted = time.perf_counter() - started
        try:
            result = await body(mount)
            result["cached_bytes"] = await asyncio.to_thread(
                wait_cached, settings.cache_dir, self.manifest.total_bytes, 30
            )
        finally:
            await mount.stop()
            shutil.rmtree(settings.cache_dir, ignore_errors=True)
        result["mount_seconds"] = round(mounted, 2)
        return result

    async def raw(self, connections: int) -> dict[str, Any]:
        store = self.storage.store
        result = await asyncio.to_thread(
            read_objects, store.s3, store.bucket, self.keys, connections
        )
        return {"seconds": result.seconds, "bytes": result.bytes, "connections": connections}

    async def sidecar(self) -> dict[str, Any]:
        settings = self.settings()

        async def stream(mount: JuiceFSMount) -> dict[str, Any]:
            files = read_manifest(mount.bento_dir).select(settings.models)
            # Timed whole: the reads, then the cache fill the sidecar does after them.
            started = time.perf_counter()
            progress = await stream_model(
                settings.warmup_concurrency,
                mount,
                files,
                time.monotonic() + settings.warmup_timeout_seconds,
                on_progress=lambda p: None,
                on_error=lambda p, e: None,
                filler=mount,
            )
            return {
                "seconds": time.perf_counter() - started,
                "read_seconds": progress.elapsed,
                "bytes": progress.done_bytes,
                "verified_files": progress.done_files,
                "retries": progress.retries,
                "concurrency": settings.warmup_concurrency,
            }

        return await self.mounted(settings, stream)

    async def juicefs_warmup(self) -> tuple[dict[str, Any], dict[str, Any]]:
        settings = self.settings()
        both: dict[str, Any] = {}

        async def warm_then_verify(mount: JuiceFSMount) -> dict[str, Any]:
            volume = self.storage.stack.juicefs
            started = time.perf_counter()
            await asyncio.to_thread(volume.warmup, [mount.models_dir])
            warmed = time.perf_counter() - started
            before = self.storage.counters()
            checked = 0
            for entry in self.manifest.files:
                digest = await asyncio.to_thread(_sha256_file, mount.models_dir / entry.path)
                if digest != entry.sha256:
                    raise RuntimeError(f"{entry.path}: sha256 differs after juicefs warmup")
                checked += 1
            verify_used = self.storage.counters() - before
            both["verify"] = {
                "seconds": time.perf_counter() - started,
                "bytes": self.manifest.total_bytes,
                "verified_files": checked,
                "verify_gets": verify_used.gets,
            }
            return {"seconds": warmed, "bytes": self.manifest.total_bytes}

        warm = await self.mounted(settings, warm_then_verify)
        return warm, {**both["verify"], "mount_seconds": warm["mount_seconds"]}

    async def cat(self) -> dict[str, Any]:
        settings = self.settings()

        async def read(mount: JuiceFSMount) -> dict[str, Any]:
            started = time.perf_counter()
            for entry in self.manifest.files:
                await asyncio.to_thread(
                    subprocess.run,
                    ["cat", str(mount.models_dir / entry.path)],
                    stdout=subprocess.DEVNULL,
                    check=True,
                )
            return {"seconds": time.perf_counter() - started, "bytes": self.manifest.total_bytes}

        return await self.mounted(settings, read)


def _rate(result: dict[str, Any]) -> float:
    return float(result["bytes"]) / MIB / max(float(result["seconds"]), 1e-9)


def summarize(runs: list[dict[str, Any]], blocks: int, raw_rate: float | None) -> dict[str, Any]:
    rates = [_rate(r) for r in runs]
    summary: dict[str, Any] = {
        "mib_per_s": round(median(rates), 1),
        "runs_mib_per_s": [round(r, 1) for r in rates],
        "seconds": [round(float(r["seconds"]), 2) for r in runs],
        "gets": [r["used"].gets for r in runs],
        "gets_per_block": round(median([r["used"].gets / blocks for r in runs]), 3),
        "bytes_from_store": [r["used"].bytes_sent for r in runs],
        "bytes_from_store_per_model_byte": round(
            median([r["used"].bytes_sent / max(1, int(r["bytes"])) for r in runs]), 3
        ),
    }
    for key in ("mount_seconds", "retries", "cached_bytes", "connections", "concurrency"):
        if key in runs[0]:
            summary[key] = [r[key] for r in runs]
    if raw_rate:
        summary["vs_raw"] = round(median(rates) / raw_rate, 3)
    return summary


async def _profile(
    passes: Passes, profile: LinkProfile, rounds: int, raw_connections: int
) -> dict[str, Any]:
    storage = passes.storage
    storage.shape(profile)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}

    async def measured(method: str, action: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        before = storage.counters()
        result = await action
        result["used"] = storage.counters() - before
        runs[method].append(result)
        say(
            SCENARIO,
            f"{profile.name} round {len(runs[method])} {method}: {_rate(result):.0f} MiB/s, "
            f"{result['used'].gets} GETs",
        )
        return result

    for _ in range(rounds):
        await measured("raw", passes.raw(raw_connections))
        await measured("sidecar", passes.sidecar())
        before = storage.counters()
        warm, verify = await passes.juicefs_warmup()
        used = storage.counters() - before
        warm["used"] = StoreRequests(used.gets - verify["verify_gets"], used.bytes_sent)
        verify["used"] = used
        for method, result in (("juicefs_warmup", warm), ("juicefs_warmup_verify", verify)):
            runs[method].append(result)
            say(SCENARIO, f"{profile.name} {method}: {_rate(result):.0f} MiB/s")
        await measured("cat", passes.cat())
    blocks = len(passes.keys)
    raw = summarize(runs["raw"], blocks, None)
    lines = {"raw": raw}
    for method in METHODS[1:]:
        lines[method] = summarize(runs[method], blocks, raw["mib_per_s"])
    sidecar, warmup = lines["sidecar"], lines["juicefs_warmup"]
    return {
        "profile": {"mb_per_s": profile.mb_per_s, "delay_ms": profile.delay_ms},
        "qdisc": storage.net.qdiscs().strip(),
        "methods": lines,
        "warmup_vs_raw": sidecar["vs_raw"],
        "warmup_vs_juicefs_warmup": round(sidecar["mib_per_s"] / warmup["mib_per_s"], 3),
        "warmup_vs_juicefs_warmup_verify": round(
            sidecar["mib_per_s"] / lines["juicefs_warmup_verify"]["mib_per_s"], 3
        ),
        "gets_per_block": sidecar["gets_per_block"],
    }


async def _bench(args: Any, record: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-streaming-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        with ShapedStorage(work / "storage") as storage:
            volume = storage.stack.juicefs
            record["versions"] = {"juicefs": volume.run("version").strip()}
            shards = [args.size_mib * MIB // args.shards] * args.shards
            source = write_random_model(work / "src", shards)
            manifest = publish(
                source, storage.stack.writer_mount, "/bentos/{name}/{version}", NAME, VERSION
            )
            shutil.rmtree(work / "src", ignore_errors=True)
            keys = storage.stack.block_keys(manifest, NAME, VERSION)
            say(
                SCENARIO,
                f"published {manifest.total_bytes / MIB:.0f} MiB, {len(manifest.files)} files, "
                f"{len(keys)} block objects",
            )
            # MinIO serves every pass from its page cache, not the first from its disk.
            read_objects(storage.store.s3, storage.store.bucket, keys, args.raw_connections)
            passes = Passes(storage, work, manifest, keys)
            record["model_bytes"] = manifest.total_bytes
            record["model_files"] = len(manifest.files)
            record["block_objects"] = len(keys)
            profiles: dict[str, Any] = {}
            for profile in args.profiles:
                profiles[profile.name] = await _profile(
                    passes, profile, args.rounds, args.raw_connections
                )
            record["profiles"] = profiles
            first = profiles[args.profiles[0].name]
            for key in ("warmup_vs_raw", "warmup_vs_juicefs_warmup", "gets_per_block"):
                record[key] = first[key]
            record["raw_mib_per_s"] = first["methods"]["raw"]["mib_per_s"]


def run(args: Any) -> dict[str, Any]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise SystemExit("streaming needs root and /dev/fuse (a real FUSE mount)")
    record = new_record(
        SCENARIO,
        {
            "model_mib": args.size_mib,
            "shards": args.shards,
            "rounds": args.rounds,
            "raw_connections": args.raw_connections,
            "profiles": [p.name for p in args.profiles],
            "mount": "the sidecar's flags (read-only, --subdir, buffer 1024 MiB, prefetch 3)",
            "store": "MinIO in its own netns, tbf on its veth egress; Redis on loopback",
        },
    )
    asyncio.run(_bench(args, record))
    return record


def table(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, figure, ratio) rows for the summary table."""
    rows = []
    for name, profile in record["profiles"].items():
        for method in METHODS:
            line = profile["methods"][method]
            ratio = f"{line.get('vs_raw', 1.0):.2f}x raw, {line['gets_per_block']:.2f} GETs/block"
            rows.append((f"{name}: {LABELS[method]}", f"{line['mib_per_s']} MiB/s", ratio))
        rows.append(
            (
                f"{name}: sidecar vs juicefs warmup",
                "",
                f"{profile['warmup_vs_juicefs_warmup']:.2f}x "
                f"({profile['warmup_vs_juicefs_warmup_verify']:.2f}x with its verify pass)",
            )
        )
    return rows
