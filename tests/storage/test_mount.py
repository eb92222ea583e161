"""What the sidecar's JuiceFS 1.4.2 mount exposes, how it dies, and whose keys it uses.

Real `juicefs mount` processes over MinIO and Redis, as in test_juicefs_sidecar.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from common.mounts import is_mounted
from common.processes import alive, children
from devcluster.juicefs import JuiceFSVolume
from devcluster.storage import MIB, PATH_TEMPLATE, StorageStack, write_random_model
from modelstore.manifest import MANIFEST_NAME, MODELS_DIR, Manifest, read_manifest, sha256_file
from modelstore.mount import JuiceFSMount, MountError
from modelstore.publish import publish
from sidecar.env import Settings


def _mounted(settings: Settings) -> list[Path]:
    return [p for p in (settings.mount_point, settings.private_mount) if is_mounted(p)]


async def _until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:.0f}s: {what}")
        await asyncio.sleep(0.1)


def _workers(mount: JuiceFSMount) -> list[int]:
    assert mount.pid is not None
    return [pid for pid, comm in children(mount.pid) if comm == "juicefs"]


def test_the_mount_reaches_only_its_bento_and_the_app_sees_only_models(
    stack: StorageStack, outage_model: Manifest, tmp_path: Path
) -> None:
    stack.publish_random(tmp_path, "llm-neighbour", "v1", [MIB])
    settings = stack.sidecar_settings(tmp_path, "llm-outage", "v1")
    mount = JuiceFSMount(settings.mount_spec())
    command = mount.command()
    assert "--read-only" in command
    assert command[command.index("--subdir") + 1] == "/bentos/llm-outage/v1"

    async def scenario() -> None:
        await mount.start()
        try:
            private = settings.private_mount
            # The FUSE mount's root is the Bento's directory: nothing above it
            # (no /bentos, no neighbour Bento) exists for this client.
            listing = set(os.listdir(private))
            assert {MANIFEST_NAME, MODELS_DIR} <= listing
            assert all(name.startswith(".") for name in listing - {MANIFEST_NAME, MODELS_DIR})
            assert read_manifest(mount.bento_dir) == outage_model
            files = {
                str(p.relative_to(mount.models_dir))
                for p in mount.models_dir.rglob("*")
                if p.is_file()
            }
            assert files == {f.path for f in outage_model.files}
            # The app's view is exactly models/: no manifest, no JuiceFS internals (.config
            # holds the object-store keys).
            writer_models = stack.bento_dir("llm-outage", "v1") / MODELS_DIR
            assert sorted(os.listdir(settings.mount_point)) == sorted(os.listdir(writer_models))
            # Read-only at the source: JuiceFS itself refuses, on the private mount too.
            for attempt in (
                lambda: (private / MANIFEST_NAME).unlink(),
                lambda: (private / "new").write_bytes(b"x"),
                lambda: (settings.mount_point / "new").write_bytes(b"x"),
            ):
                with pytest.raises(OSError, match="Read-only file system") as excinfo:
                    attempt()
                assert excinfo.value.errno == errno.EROFS
        finally:
            await mount.stop()
        assert _mounted(settings) == []

    asyncio.run(scenario())


def test_a_missing_bento_fails_the_mount_with_a_message_that_says_so(
    stack: StorageStack, tmp_path: Path
) -> None:
    settings = stack.sidecar_settings(tmp_path, "never-published", "v1")
    mount = JuiceFSMount(settings.mount_spec())

    async def scenario() -> None:
        try:
            with pytest.raises(MountError, match=r"the volume has no /bentos/never-published/v1"):
                await mount.start(mount_timeout=60)
        finally:
            await mount.stop()

    asyncio.run(scenario())
    assert _mounted(settings) == []


def test_a_crashed_worker_is_replaced_and_only_the_supervisor_exiting_kills_the_mount(
    stack: StorageStack, outage_model: Manifest, tmp_path: Path
) -> None:
    settings = stack.sidecar_settings(tmp_path, "llm-outage", "v1")
    shard = outage_model.select(())[-1]
    mount = JuiceFSMount(settings.mount_spec())

    async def scenario() -> None:
        await mount.start()
        try:
            # `juicefs mount` (1.x) is a supervisor with one worker serving FUSE.
            first = _workers(mount)
            assert len(first) == 1, first
            os.kill(first[0], signal.SIGKILL)
            await _until(
                lambda: bool(_workers(mount)) and _workers(mount) != first,
                30,
                "the supervisor starting a new worker",
            )
            # Same FUSE connection: the app's mount never went away.
            path = settings.mount_point / shard.path
            assert await asyncio.to_thread(sha256_file, path) == shard.sha256
            assert mount.pid is not None
            assert alive(mount.pid)

            worker = _workers(mount)[0]
            os.kill(mount.pid, signal.SIGKILL)  # what the sidecar reports as MountDied
            assert await asyncio.wait_for(mount.wait_exit(), 10) == -signal.SIGKILL
        finally:
            await mount.stop()
        assert _mounted(settings) == []
        # The orphaned worker goes too.
        await _until(lambda: not alive(worker), 30, "the orphaned worker exiting")

    asyncio.run(scenario())


def test_tenant_keys_from_the_sidecar_env_are_used_when_the_volume_stores_none(
    stack: StorageStack, tmp_path: Path
) -> None:
    # `juicefs mount` takes no keys: those stored at format time win. A volume
    # formatted without keys makes every client bring its own.
    volume = JuiceFSVolume(
        "tenant", stack.store, stack.redis, stack.logs, db=2, binary=stack.juicefs.binary
    )
    volume.format(store_keys=False)
    writer = volume.mount(tmp_path / "writer", tmp_path / "writer-cache", env=volume.keys_env)
    try:
        models = write_random_model(tmp_path / "src", [8 * MIB])
        manifest = publish(models, writer, PATH_TEMPLATE, "tenant-llm", "v1")
    finally:
        volume.umount()
    shard = manifest.select(())[-1]
    base = replace(
        stack.sidecar_settings(tmp_path / "pod", "tenant-llm", "v1"), meta_url=volume.meta_url
    )

    async def read_shard(settings: Settings) -> str | None:
        """The shard's sha256 through a sidecar mount, None if it cannot be read in 20 s."""
        mount = JuiceFSMount(settings.mount_spec())
        await mount.start()
        try:
            path = mount.models_dir / shard.path
            return await asyncio.wait_for(asyncio.to_thread(sha256_file, path), 20)
        except (OSError, TimeoutError):
            return None
        finally:
            await mount.stop()

    keys = replace(base, access_key=stack.store.access_key, secret_key=stack.store.secret_key)
    assert asyncio.run(read_shard(keys)) == shard.sha256
    wrong = replace(keys, secret_key="not-the-secret-key", cache_dir=tmp_path / "cache-2")
    assert asyncio.run(read_shard(wrong)) is None
