"""The sidecar's mount and warmup over a real JuiceFS FUSE mount, MinIO and Redis.

Nothing here is mocked: `modelstore.mount.JuiceFSMount` runs the juicefs 1.4.2
client, `modelstore.streamer.Streamer` reads through FUSE, blocks come from MinIO.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest

from devcluster.juicefs import cached_blocks, wait_cached
from devcluster.s3 import S3Error, read_objects
from devcluster.storage import MIB, StorageStack
from devcluster.throttle import ThrottledDirectory, ThrottleUnavailable
from modelstore.manifest import Manifest, read_manifest, sha256_file
from modelstore.mount import JuiceFSMount
from modelstore.streamer import Progress, Streamer, VerificationError, stream_model
from sidecar.env import Settings
from sidecar.reporter import Reporter
from sidecar.run import warm
from tests.helpers import flip_middle_byte

from .conftest import SMALL_SHARDS


def _sha256(path: Path) -> str:
    return sha256_file(path)


async def _stream(
    settings: Settings, on_progress: Callable[[Progress], None]
) -> tuple[JuiceFSMount, Progress]:
    """Mount like the sidecar and stream the whole model; the mount stays up."""
    mount = JuiceFSMount(settings.mount_spec())
    await mount.start()
    try:
        progress = await stream_model(
            settings.warmup_concurrency,
            mount,
            read_manifest(mount.bento_dir).select(settings.models),
            time.monotonic() + settings.warmup_timeout_seconds,
            on_progress=on_progress,
            on_error=lambda p, e: None,
            filler=mount,
        )
    except BaseException:
        await mount.stop()
        raise
    return mount, progress


def test_warmup_fills_the_cache_and_serves_the_model_read_only(
    stack: StorageStack, big_model: Manifest, tmp_path: Path
) -> None:
    assert big_model.total_bytes >= 1 << 30
    settings = stack.sidecar_settings(tmp_path, "llm-big", "v1")
    last_shard = big_model.select(())[-1]
    app_read: dict[str, Any] = {}

    def app_reader() -> None:
        # The app opens the model through the read-only bind mount, as a container would.
        app_read["started"] = time.monotonic()
        app_read["sha256"] = _sha256(settings.mount_point / last_shard.path)
        app_read["finished"] = time.monotonic()

    reader = threading.Thread(target=app_reader, name="app-reader")

    def on_progress(progress: Progress) -> None:
        if progress.fraction >= 0.25 and not reader.is_alive() and "started" not in app_read:
            reader.start()

    def check_while_mounted(mount: JuiceFSMount, progress: Progress, warm_finished: float) -> int:
        reader.join(120)
        assert app_read.get("sha256") == last_shard.sha256
        assert app_read["started"] < warm_finished, "the app read started before warmup finished"
        print(
            f"app read of {last_shard.path} started {warm_finished - app_read['started']:.1f}s "
            f"before warmup finished; took {app_read['finished'] - app_read['started']:.1f}s"
        )
        assert progress.done_bytes == big_model.total_bytes
        assert progress.done_files == len(big_model.files)

        # The cache holds every block of every file: the reads cache most of
        # them, on the side (asynchronously, hence the wait), and drop some when
        # the disk falls behind; the sidecar's fill afterwards adds those.
        cached = wait_cached(settings.cache_dir, big_model.total_bytes)
        assert cached >= big_model.total_bytes
        blocks = cached_blocks(settings.cache_dir)
        # Asked through the writer's mount: `juicefs info` needs HGETALL, which tenants lack.
        wanted = {key.rsplit("/", 1)[1] for key in stack.block_keys(big_model, "llm-big", "v1")}
        missing = sorted(wanted - set(blocks))
        assert not missing, f"{len(missing)} blocks never reached the cache: {missing[:5]}"

        # What the app sees: the same bytes, read-only.
        for entry in big_model.files:
            assert _sha256(settings.mount_point / entry.path) == entry.sha256, entry.path
        shard = settings.mount_point / last_shard.path
        for attempt in (
            lambda: (settings.mount_point / "new-file").write_bytes(b"x"),
            lambda: shard.open("r+b").close(),
            lambda: shard.unlink(),
            lambda: (settings.mount_point / "new-dir").mkdir(),
        ):
            with pytest.raises(OSError, match="Read-only file system") as excinfo:
                attempt()
            assert excinfo.value.errno == errno.EROFS
        return cached

    async def scenario() -> tuple[Progress, int]:
        mount, progress = await _stream(settings, on_progress)
        warm_finished = time.monotonic()
        try:
            cached = await asyncio.to_thread(check_while_mounted, mount, progress, warm_finished)
        finally:
            await mount.stop()
            shutil.rmtree(settings.cache_dir, ignore_errors=True)
        assert not mount.answers()
        assert not settings.mount_point.is_mount()
        assert not settings.private_mount.is_mount()
        return progress, cached

    progress, cached = asyncio.run(scenario())

    keys = stack.block_keys(big_model, "llm-big", "v1")
    raw = read_objects(stack.store.s3, stack.store.bucket, keys, settings.warmup_concurrency)
    assert raw.bytes == big_model.total_bytes
    print(
        f"warmup {progress.mb_per_s:.0f} MB/s vs raw parallel GETs {raw.mb_per_s:.0f} MB/s "
        f"(ratio {progress.mb_per_s / raw.mb_per_s:.2f}); {cached} bytes cached"
    )


def test_object_store_outage_stalls_the_stream_until_it_is_back(
    stack: StorageStack, outage_model: Manifest, tmp_path: Path, store_back: None
) -> None:
    settings = stack.sidecar_settings(tmp_path, "llm-outage", "v1")
    errors: list[tuple[float, str]] = []
    stopped_at: list[float] = []

    def on_progress(progress: Progress) -> None:
        if progress.fraction >= 0.2 and not stopped_at:
            stack.store.stop(kill=True)  # the object store goes away mid-stream
            stopped_at.append(time.monotonic())
            print(f"MinIO killed at {progress.describe()}")

    failing = asyncio.Event()

    def on_error(progress: Progress, err: OSError) -> None:
        errors.append((time.monotonic(), f"{err}"))
        failing.set()

    async def scenario() -> Progress:
        mount = JuiceFSMount(settings.mount_spec())
        await mount.start()
        try:
            files = read_manifest(mount.bento_dir).select(())
            streamer = Streamer(
                root=mount.models_dir,
                concurrency=settings.warmup_concurrency,
                deadline=time.monotonic() + 120,
                on_progress=on_progress,
                on_error=on_error,
            )
            task = asyncio.ensure_future(streamer.run(files))
            noticed = asyncio.ensure_future(failing.wait())
            await asyncio.wait({task, noticed}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            noticed.cancel()
            assert errors, "reads kept succeeding with the object store down"
            await asyncio.sleep(3)
            assert not task.done(), "the stream finished while the object store was down"
            print(f"{len(errors)} failed reads reported, first: {errors[0][1]}")
            await asyncio.to_thread(stack.store.start)  # same port, same data
            restarted = time.monotonic()
            progress = await asyncio.wait_for(task, 90)
            print(f"stream completed {time.monotonic() - restarted:.1f}s after MinIO came back")
            return progress
        finally:
            await mount.stop()

    progress = asyncio.run(scenario())
    assert stopped_at
    assert progress.done_files == len(outage_model.files)
    assert progress.done_bytes == outage_model.total_bytes
    assert progress.retries >= 1
    assert errors[0][0] >= stopped_at[0]


class RecordingReporter:
    """Stands in for AgentReporter where no apiserver is involved."""

    def __init__(self) -> None:
        self.conditions: list[tuple[str, str, str]] = []
        self.events: list[tuple[str, str, str]] = []

    async def set_condition(self, status: str, reason: str, message: str) -> None:
        self.conditions.append((status, reason, message))

    async def event(self, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))


def test_a_corrupted_block_fails_verification_and_the_gate_stays_shut(
    stack: StorageStack, scratch: Path, tmp_path: Path
) -> None:
    manifest = stack.publish_random(scratch, "llm-corrupt", "v1", SMALL_SHARDS)
    shard = manifest.select(())[-2]
    keys = stack.juicefs.object_keys(stack.bento_dir("llm-corrupt", "v1") / "models" / shard.path)
    assert len(keys) == shard.size // (4 * MIB)
    victim = keys[1]
    assert stack.store.object_files(victim), "MinIO keeps the object in its data dir"
    data = bytearray(stack.store.s3.get_object(stack.store.bucket, victim))
    data[len(data) // 2] ^= 0x5A
    # Replaced through the S3 API: MinIO serves the changed bytes with valid
    # checksums of its own, as a buggy writer or a tampered bucket would.
    stack.store.s3.put_object(stack.store.bucket, victim, bytes(data))

    settings = stack.sidecar_settings(tmp_path, "llm-corrupt", "v1")
    assert not settings.cache_dir.exists(), "a fresh cache: the block can only come from MinIO"
    reporter = RecordingReporter()

    async def scenario() -> bool:
        mount = JuiceFSMount(settings.mount_spec())
        await mount.start()
        try:
            streamer = Streamer(
                root=mount.models_dir,
                concurrency=4,
                deadline=time.monotonic() + 60,
                on_progress=lambda p: None,
                on_error=lambda p, e: None,
            )
            with pytest.raises(VerificationError, match=rf"{shard.path}: sha256 .* differs"):
                await streamer.run(manifest.select(()))
            # Evicting the file's cached blocks and reading it again fetches the same bad bytes.
            return await warm(settings, mount, cast(Reporter, reporter), purger=mount)
        finally:
            await mount.stop()

    assert asyncio.run(scenario()) is False
    assert [c[:2] for c in reporter.conditions] == [("False", "VerificationFailed")]
    assert not any(c[0] == "True" for c in reporter.conditions)
    reasons = [e[1] for e in reporter.events]
    assert reasons == ["WarmupStarted", "CacheBlocksPurged", "VerificationFailed"], reporter.events
    assert shard.path in reporter.events[-1][2]
    assert reporter.events[-1][2].endswith("(read again after evicting its cached blocks)")


def _cached_block(cache_dir: Path, name: str) -> Path:
    found = [p for p in cache_dir.glob("*/raw/**/*") if p.name == name]
    assert len(found) == 1, f"block {name} in {cache_dir}: {found}"
    return found[0]


def test_a_corrupt_cached_block_is_purged_and_fetched_again(
    stack: StorageStack, scratch: Path, tmp_path: Path
) -> None:
    """The cache serves a bad block until it is removed; the sidecar removes it and reads again."""
    manifest = stack.publish_random(scratch, "llm-cache-rot", "v1", SMALL_SHARDS)
    shard = manifest.select(())[-1]
    keys = stack.juicefs.object_keys(stack.bento_dir("llm-cache-rot", "v1") / "models" / shard.path)
    victim = keys[1]
    name = victim.rsplit("/", 1)[1]  # the object's <slice>_<index>_<size>, the cached block's
    size = int(name.rsplit("_", 1)[1])
    good = stack.store.s3.get_object(stack.store.bucket, victim)
    assert len(good) == size
    settings = stack.sidecar_settings(tmp_path, "llm-cache-rot", "v1")

    async def verify(purge: bool) -> RecordingReporter:
        """A pod's warm on a fresh mount of the same cache dir, purging or not."""
        reporter = RecordingReporter()
        mount = JuiceFSMount(settings.mount_spec())
        await mount.start()
        try:
            await warm(
                settings,
                mount,
                cast(Reporter, reporter),
                filler=mount,
                purger=mount if purge else None,
            )
        finally:
            await mount.stop()
        return reporter

    def reasons(reporter: RecordingReporter) -> list[str]:
        return [e[1] for e in reporter.events]

    first = asyncio.run(verify(purge=True))  # a cold cache: every block from MinIO
    assert reasons(first) == ["WarmupStarted", "ModelsReady"], first.events
    block = _cached_block(settings.cache_dir, name)
    assert block.read_bytes()[:size] == good

    # One byte flipped with JuiceFS's checksums (after the block's bytes) intact:
    # JuiceFS itself refuses the block and reads it from the store.
    flip_middle_byte(block)
    caught = asyncio.run(verify(purge=False))
    assert reasons(caught) == ["WarmupStarted", "ModelsReady"], caught.events

    # The block's bytes alone, one changed, without checksums: JuiceFS 1.4.2 serves
    # a cache file of exactly the block's size unchecked, as a writer of the cache dir
    # could make it. Without a purge, the pod can never verify on this node.
    block = _cached_block(settings.cache_dir, name)
    corrupt = bytearray(good)
    corrupt[size // 2] ^= 0xFF
    block.write_bytes(bytes(corrupt))
    stuck = asyncio.run(verify(purge=False))
    assert reasons(stuck) == ["WarmupStarted", "VerificationFailed"], stuck.events
    assert shard.path in stuck.events[-1][2]
    assert _cached_block(settings.cache_dir, name).read_bytes() == bytes(corrupt)

    purged = asyncio.run(verify(purge=True))
    assert reasons(purged) == ["WarmupStarted", "CacheBlocksPurged", "ModelsReady"], purged.events
    assert purged.events[1][2].startswith(f"{shard.path}: sha256 ")
    assert not purged.conditions, "warm() sets no condition when it verified"
    # The block is good in the cache afterwards (fetched again, or by the fill).
    cached = _cached_block(settings.cache_dir, name).read_bytes()
    assert cached[:size] == good
    assert len(cached) > size, "written by JuiceFS again, with its checksums"


def test_bytes_rotting_in_the_store_stall_the_stream_and_never_open_the_gate(
    stack: StorageStack, scratch: Path, tmp_path: Path
) -> None:
    manifest = stack.publish_random(scratch, "llm-rot", "v1", SMALL_SHARDS)
    shard = manifest.select(())[-1]
    victim = stack.juicefs.object_keys(stack.bento_dir("llm-rot", "v1") / "models" / shard.path)[0]
    part = next(p for p in stack.store.object_files(victim) if p.name.startswith("part."))
    with part.open("r+b") as handle:  # one bit flipped on MinIO's disk
        handle.seek(100_000)
        byte = handle.read(1)[0]
        handle.seek(100_000)
        handle.write(bytes([byte ^ 0x01]))
    # MinIO's own bitrot check refuses to serve it; no wrong byte reaches JuiceFS.
    with pytest.raises(S3Error, match="HTTP 503"):
        stack.store.s3.get_object(stack.store.bucket, victim)

    timeout = 8
    settings = replace(
        stack.sidecar_settings(tmp_path, "llm-rot", "v1"), warmup_timeout_seconds=timeout
    )
    reporter = RecordingReporter()

    async def scenario() -> bool:
        mount = JuiceFSMount(settings.mount_spec())
        await mount.start()
        try:
            return await warm(settings, mount, cast(Reporter, reporter))
        finally:
            await mount.stop()

    # JuiceFS keeps retrying the 503s, so the read hangs rather than fails: the
    # sidecar's own deadline ends the warmup, and the gate stays shut.
    started = time.monotonic()
    assert asyncio.run(scenario()) is False
    assert time.monotonic() - started < timeout + 30
    assert [c[:2] for c in reporter.conditions] == [("False", "WarmupTimedOut")]
    reasons = [e[1] for e in reporter.events]
    assert reasons[0] == "WarmupStarted"
    assert reasons[-1] == "WarmupTimedOut", reporter.events
    assert "ModelsReady" not in reasons
    assert shard.path.rsplit("/", 1)[1] in reporter.events[-1][2]


PROBE = (
    "import json, sys; from pathlib import Path; from sidecar.cachedisk import measure; "
    "s = measure(Path(sys.argv[1]), size_mib=int(sys.argv[2])); "
    "print(json.dumps({'write': s.write_mbps, 'read': s.read_mbps, 'direct': s.direct_io, "
    "'slow': s.slower_than(float(sys.argv[3])), 'text': s.describe()}))"
)


def test_a_slow_cache_directory_is_reported(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("throttling a block device needs root")
    minimum = 200.0  # the injector's default warmup.cacheMinMbps
    try:
        slow = ThrottledDirectory(tmp_path / "slow", bytes_per_second=8 * MIB).start()
    except ThrottleUnavailable as err:
        pytest.skip(f"cannot make a really slow directory here: {err}")
    try:
        print(f"throttled with {slow.method} (8 MB/s); not used: {slow.attempts or 'none'}")
        cache = slow.path / "cache"
        proc = slow.run_throttled([sys.executable, "-c", PROBE, str(cache), "16", str(minimum)])
        assert proc.returncode == 0, proc.stderr
        measured = json.loads(proc.stdout)
        print(f"cacheprobe on the throttled dir: {measured['text']}")
        assert measured["slow"] is True
        assert min(measured["write"], measured["read"]) < 20
        if slow.method != "dm-delay":  # a cgroup limit binds only its own processes
            fast = subprocess.run(
                [sys.executable, "-c", PROBE, str(cache), "16", str(minimum)],
                capture_output=True,
                text=True,
                check=True,
            )
            unthrottled = json.loads(fast.stdout)
            print(f"the same dir outside the cgroup: {unthrottled['text']}")
            assert min(unthrottled["write"], unthrottled["read"]) > 4 * max(
                measured["write"], measured["read"]
            )
    finally:
        slow.stop()
    assert not slow.path.is_mount()


def test_published_layout_is_what_the_sidecar_expects(
    stack: StorageStack, outage_model: Manifest
) -> None:
    bento = stack.bento_dir("llm-outage", "v1")
    assert read_manifest(bento) == outage_model
    assert {f.model for f in outage_model.files} == {"llm:v1", "llm"}
    big = [f for f in outage_model.select(()) if f.size > MIB]
    assert [f.path for f in big] == sorted(f.path for f in big), "shards stream in name order"
    settings = stack.sidecar_settings(Path("/unused"), "llm-outage", "v1")
    assert settings.bento_path == "/bentos/llm-outage/v1"
