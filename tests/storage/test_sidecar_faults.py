"""The whole sidecar (`sidecar.run.run`) under storage faults, on real JuiceFS, MinIO and Redis.

- The object store flapping (MinIO killed and restarted several times)
  during the warmup: the warmup completes, every file verifies, and no
  corrupt block is left in the cache: each cached block equals its object,
  and a second mount reads the whole model back from the cache alone (MinIO
  down) with every sha256 matching.
- A really slow cache disk under the `required` SSD policy (a throttled
  loop device): the sidecar mounts without a disk cache and still streams
  and verifies every byte before it sets the condition (ModelsVerified).

Nothing is mocked but the apiserver (a recorder stands in for the agent reporter).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from devcluster.juicefs import cached_blocks
from devcluster.storage import MIB, StorageStack
from devcluster.throttle import ThrottledDirectory, ThrottleUnavailable
from modelstore.manifest import Manifest, read_manifest
from modelstore.mount import JuiceFSMount
from modelstore.streamer import Progress, stream_model
from sidecar.env import Settings
from tests.kit.sidecar import run_until_ready

REPO = Path(__file__).resolve().parents[2]


# -- the object store flapping during the warmup -------------------------------------------


@dataclass
class Flapper:
    """Kills MinIO and starts it again, `times` times, once the stream is under way."""

    stack: StorageStack
    cache_dir: Path
    start_at_bytes: int
    times: int = 4
    down: float = 2.0
    up: float = 1.5
    outages: list[tuple[float, float]] = field(default_factory=list)  # (killed, back)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        deadline = time.monotonic() + 300
        while sum(cached_blocks(self.cache_dir).values()) < self.start_at_bytes:
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            time.sleep(0.01)
        for _ in range(self.times):
            if self.stop.is_set():
                return
            self.stack.store.stop(kill=True)
            killed = time.monotonic()
            time.sleep(self.down)
            self.stack.store.start()
            self.outages.append((killed, time.monotonic()))
            time.sleep(self.up)


def test_a_flapping_object_store_mid_warmup_still_verifies_and_leaves_no_corrupt_block(
    stack: StorageStack, big_model: Manifest, tmp_path: Path, store_back: None
) -> None:
    settings = replace(stack.sidecar_settings(tmp_path, "llm-big", "v1"), warmup_concurrency=4)
    flapper = Flapper(stack, settings.cache_dir, start_at_bytes=big_model.total_bytes // 20)
    thread = threading.Thread(target=flapper.run, name="flapper")
    thread.start()
    try:
        with capture_logs() as logs:
            code, recorder = run_until_ready(settings)
    finally:
        flapper.stop.set()
        thread.join(60)
        if not stack.store.running:
            stack.store.start()

    assert code == 0
    seen = recorder.reasons()
    assert seen[seen.index("ModelsReady") :] == [
        "ModelsReady",
        "True:ModelsCached",
        "Ready",
        "Unmounted",
    ], recorder.said
    assert "VerificationFailed" not in seen
    ready_at = recorder.at("ModelsReady")
    mid_warmup = [o for o in flapper.outages if o[0] < ready_at]
    read_failures = sum(1 for entry in logs if entry["event"] == "warmup.read_failed")
    fills = [
        (entry["event"], entry.get("error") or entry.get("attempt"))
        for entry in logs
        if str(entry["event"]).startswith("cache.fill")
    ]
    timeline = [(round(k - ready_at, 1), round(b - ready_at, 1)) for k, b in flapper.outages]
    print(f"outages (killed, back) relative to ModelsReady: {timeline}; cache fill: {fills}")
    assert mid_warmup, f"no outage before ModelsReady: {flapper.outages}, {recorder.said}"

    # Every cached block is byte for byte its object (the cache file adds checksums after it).
    blocks = cached_blocks(settings.cache_dir)
    keys = stack.block_keys(big_model, "llm-big", "v1")
    by_name = {key.rsplit("/", 1)[1]: key for key in keys}
    missing = sorted(set(by_name) - set(blocks))
    assert not missing, f"{len(missing)} of the model's blocks are not in the cache: {missing[:5]}"
    corrupt = []
    for path in settings.cache_dir.glob("*/raw/**/*"):
        if path.name in by_name and path.is_file():
            cached = path.read_bytes()[: blocks[path.name]]
            if cached != stack.store.s3.get_object(stack.store.bucket, by_name[path.name]):
                corrupt.append(path.name)
    assert not corrupt, f"{len(corrupt)} cached blocks differ from their objects: {corrupt[:5]}"

    # And the cache alone serves the whole model, proven against the manifest.
    stack.store.stop(kill=True)
    try:
        again_started = time.monotonic()
        progress = asyncio.run(_verify_from_cache(settings, deadline=120))
        again = time.monotonic() - again_started
    finally:
        stack.store.start()
    assert progress.done_bytes == big_model.total_bytes
    assert progress.retries == 0  # not one read went to the (dead) store
    print(
        f"MinIO flapped {len(flapper.outages)} times ({len(mid_warmup)} before ModelsReady, "
        f"down {flapper.down:.0f}s each): the sidecar retried {read_failures} failed reads, "
        f"verified {big_model.total_bytes / MIB:.0f} MiB, Ready "
        f"{ready_at - flapper.outages[0][0]:.1f}s after the first outage; "
        f"{len(blocks)} cached blocks equal their objects; the model re-read from the cache "
        f"alone (MinIO down) and verified in {again:.1f}s ({progress.mb_per_s:.0f} MB/s)"
    )


async def _verify_from_cache(settings: Settings, deadline: float) -> Progress:
    mount = JuiceFSMount(settings.mount_spec())
    await mount.start()
    try:
        files = read_manifest(mount.bento_dir).select(settings.models)
        return await stream_model(
            settings.warmup_concurrency,
            mount,
            files,
            time.monotonic() + deadline,
            on_progress=lambda p: None,
            on_error=lambda p, e: None,
        )
    finally:
        await mount.stop()


# -- a really slow cache disk under the `required` policy ------------------------------------

RUN_RECORDED = """
import asyncio, dataclasses, json, sys, time
from pathlib import Path
from sidecar.env import Settings
from tests.kit.sidecar import run_until_ready

fields = json.loads(Path(sys.argv[1]).read_text())
paths = {f.name for f in dataclasses.fields(Settings) if "Path" in str(f.type)}
fields["models"] = tuple(fields["models"])
settings = Settings(
    **{k: Path(v) if k in paths and v is not None else v for k, v in fields.items()}
)
code, recorder = run_until_ready(settings)
print(json.dumps({"code": code, "said": recorder.said}))
"""


def test_a_slow_cache_disk_under_required_opens_the_gate_only_after_verifying(
    stack: StorageStack, outage_model: Manifest, tmp_path: Path
) -> None:
    try:
        slow = ThrottledDirectory(tmp_path / "slow", bytes_per_second=8 * MIB).start()
    except ThrottleUnavailable as err:
        pytest.skip(f"cannot make a really slow directory here: {err}")
    try:
        settings = replace(
            stack.sidecar_settings(tmp_path, "llm-outage", "v1"),
            cache_dir=slow.path / "cache",
            ssd_policy="required",
            cache_min_mbps=200.0,  # the injector's default warmup.cacheMinMbps
        )
        config = tmp_path / "settings.json"
        config.write_text(json.dumps(dataclasses.asdict(settings), default=str))
        # The whole sidecar in the throttled cgroup (a cgroup limit binds its processes).
        proc = slow.run_throttled([sys.executable, "-c", RUN_RECORDED, str(config)], timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        cached = sum(cached_blocks(settings.cache_dir).values())
    finally:
        slow.stop()
    said = [(t, what, reason, message) for t, what, reason, message in result["said"]]
    reasons = [reason for _, _, reason, _ in said]
    assert result["code"] == 0
    assert reasons == [
        "SlowCacheDisk",
        "False:Mounting",
        "MountReady",
        "WarmupStarted",
        "ModelsReady",
        "True:ModelsVerified",
        "Ready",
        "Unmounted",
    ], said
    slow_message = said[0][3]
    assert "mounting without a disk cache" in slow_message
    assert "block cache: none" in said[2][3]
    verified_at = said[4][0]
    gate_at = said[5][0]
    assert gate_at >= verified_at
    assert f"{len(outage_model.files)} files verified" in said[4][3]
    assert cached == 0  # no disk cache: nothing was written to the slow disk
    print(
        f"slow disk ({slow.method}, 8 MB/s) under `required`: {slow_message}; "
        f"{said[4][3]}; condition True (ModelsVerified) {gate_at - verified_at:.3f}s after "
        f"the last byte was verified, {gate_at - said[2][0]:.1f}s after the mount"
    )
