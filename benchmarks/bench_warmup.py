"""Warmup throughput versus the object store's own, measured in the same run.

    python benchmarks/bench_warmup.py [--size-mib 1024] [--shards 4] [--concurrency 8]
                                      [--out bench-storage.json]

Starts real MinIO + Redis, formats a JuiceFS volume, publishes a random model
with `sidecar.publish`, then runs the sidecar's own JuiceFSMount + Streamer
with a fresh cache dir (the MB/s a pod's warmup would see), and GETs every
block object of the model straight from MinIO with parallel SigV4-signed
requests (the MB/s the object store gives without JuiceFS and FUSE). Needs
root and /dev/fuse; the minio/juicefs binaries come from hack/build-binaries.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from devcluster.storage import (
    MIB,
    ReadResult,
    StorageStack,
    cached_blocks,
    read_objects,
    write_random_model,
)
from sidecar.env import Settings
from sidecar.manifest import Manifest, read_manifest
from sidecar.mount import JuiceFSMount
from sidecar.publish import bento_dir, publish
from sidecar.warmup import Progress, Streamer

REPO = Path(__file__).resolve().parent.parent
PATH_TEMPLATE = "/bentos/{name}/{version}"
DEFAULT_OUT = REPO / "bench-storage.json"


def sidecar_settings(stack: StorageStack, work: Path, name: str, version: str) -> Settings:
    """The sidecar's settings as the injector's defaults make them, paths under work."""
    return Settings(
        pod_name="bench",
        pod_namespace="bench",
        pod_uid="",
        meta_url=stack.juicefs.meta_url,
        access_key=None,
        secret_key=None,
        bento_name=name,
        bento_version=version,
        bento_path=PATH_TEMPLATE.format(name=name, version=version),
        models=(),
        mount_point=work / "mnt",
        private_mount=work / "volume",
        cache_dir=work / "cache",
        cache_size_mib=4096,
        buffer_size_mib=1024,
        prefetch=3,
        ssd_policy="off",
        warmup=True,
        warmup_timeout_seconds=600,
        warmup_concurrency=8,
        condition_type="juicefs.bentoml.com/models-ready",
        cache_min_mbps=0,
        juicefs_bin=str(stack.juicefs.binary),
        token_dir=work / "token",
    )


def publish_random(
    stack: StorageStack, scratch: Path, name: str, version: str, shards: list[int]
) -> Manifest:
    """Random shards written locally, then published through the writer mount."""
    source = scratch / f"src-{name}-{version}"
    try:
        models = write_random_model(source, shards)
        return publish(models, stack.writer_mount, PATH_TEMPLATE, name, version)
    finally:
        shutil.rmtree(source, ignore_errors=True)


def block_keys(stack: StorageStack, manifest: Manifest, name: str, version: str) -> list[str]:
    models = bento_dir(stack.writer_mount, PATH_TEMPLATE, name, version) / "models"
    return [key for f in manifest.files for key in stack.juicefs.object_keys(models / f.path)]


async def stream(
    settings: Settings,
    on_progress: Callable[[Progress], None] | None = None,
    on_error: Callable[[Progress, OSError], None] | None = None,
) -> tuple[JuiceFSMount, Progress]:
    """Mount like the sidecar and stream the whole model; the mount stays up."""
    mount = JuiceFSMount(settings)
    await mount.start()
    try:
        files = read_manifest(mount.bento_dir).select(settings.models)
        streamer = Streamer(
            root=mount.models_dir,
            concurrency=settings.warmup_concurrency,
            deadline=time.monotonic() + settings.warmup_timeout_seconds,
            on_progress=on_progress or (lambda p: None),
            on_error=on_error or (lambda p, e: None),
        )
        progress = await streamer.run(files)
    except BaseException:
        await mount.stop()
        raise
    return mount, progress


async def wait_cached(cache_dir: Path, want: int, within: float = 60.0) -> int:
    """JuiceFS writes cache blocks asynchronously: poll until want bytes are there."""
    deadline = time.monotonic() + within
    while True:
        have = sum(cached_blocks(cache_dir).values())
        if have >= want or time.monotonic() > deadline:
            return have
        await asyncio.sleep(0.2)


def result_record(
    manifest: Manifest, progress: Progress, raw: ReadResult, settings: Settings, cached: int
) -> dict[str, Any]:
    return {
        "what": "sidecar warmup (JuiceFS 0.14.2 FUSE mount, fresh cache) vs raw MinIO GETs",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "kernel": platform.release(),
        },
        "model_bytes": manifest.total_bytes,
        "model_files": len(manifest.files),
        "warmup": {
            "mb_per_s": round(progress.mb_per_s, 1),
            "seconds": round(progress.elapsed, 2),
            "concurrency": settings.warmup_concurrency,
            "buffer_size_mib": settings.buffer_size_mib,
            "prefetch": settings.prefetch,
            "retries": progress.retries,
            "cached_bytes": cached,
        },
        "raw_object_store": {
            "mb_per_s": round(raw.mb_per_s, 1),
            "seconds": round(raw.seconds, 2),
            "objects": raw.objects,
            "bytes": raw.bytes,
            "concurrency": raw.concurrency,
        },
        "warmup_vs_raw": round(progress.mb_per_s / raw.mb_per_s, 3) if raw.mb_per_s else None,
    }


def write_result(record: dict[str, Any], out: Path = DEFAULT_OUT) -> str:
    out.write_text(json.dumps(record, indent=2) + "\n")
    w, r = record["warmup"], record["raw_object_store"]
    return (
        f"warmup {w['mb_per_s']} MB/s ({record['model_bytes'] / MIB:.0f} MiB in {w['seconds']}s, "
        f"{w['concurrency']} parallel reads) vs raw object store {r['mb_per_s']} MB/s "
        f"({r['objects']} GETs, {r['concurrency']} connections): ratio {record['warmup_vs_raw']}; "
        f"written to {out}"
    )


async def bench(size_mib: int, shards: int, concurrency: int, out: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-warmup-") as tmp:
        work = Path(tmp)
        with StorageStack(work / "storage") as stack:
            sizes = [size_mib * MIB // shards] * shards
            manifest = publish_random(stack, work, "bench", "v1", sizes)
            settings = replace(
                sidecar_settings(stack, work / "pod", "bench", "v1"),
                warmup_concurrency=concurrency,
                cache_size_mib=max(4096, 2 * size_mib),
            )
            mount, progress = await stream(settings)
            try:
                cached = await wait_cached(settings.cache_dir, manifest.total_bytes)
            finally:
                await mount.stop()
            keys = block_keys(stack, manifest, "bench", "v1")
            raw = read_objects(stack.store.s3, stack.store.bucket, keys, concurrency)
            record = result_record(manifest, progress, raw, settings, cached)
    print(write_result(record, out))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("needs root and /dev/fuse (a real FUSE mount)", file=sys.stderr)
        return 2
    asyncio.run(bench(args.size_mib, args.shards, args.concurrency, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
