"""The node agent mounting for an unprivileged sidecar, over real JuiceFS, MinIO and Redis.

No Kubernetes here: the agent's `PodBroker` runs in this process (root) over
a directory laid out as the kubelet lays out a pod's emptyDirs, with a fake
API that records the Events and the condition; the sidecar runs as it does
in its container, `python -m sidecar run` as uid 65532 with no capabilities
and no_new_privs (setpriv). What it shows: the sidecar mounts nothing
itself, serves the FUSE mount through the descriptor the agent passed,
verifies the model and gets its condition set through the agent, and the
app's view (the mount dir) has exactly the published bytes, read-only.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common import env as contract
from common.mounts import is_fuse, is_mounted, top_mount, unmount
from common.warm import BentoRef
from devcluster.storage.stack import StorageStack
from injector.config import parse_config
from modelstore.localcopy import LocalCopy
from modelstore.manifest import Manifest, sha256_file
from modelstore.streamer import stream_model
from nodeagent import fuse
from nodeagent.podmounts import PodBroker
from nodeagent.servedpods import ServedPod, pod_paths
from tests.helpers import fuse_servers
from tests.kit.sidecar import PublishedBento

from .conftest import SMALL_SHARDS

REPO = Path(__file__).resolve().parents[2]
UID = contract.SIDECAR_UID


@dataclass
class RecordingApi:
    events: list[tuple[str, str, str]] = field(default_factory=list)
    conditions: list[tuple[str, str, str]] = field(default_factory=list)

    async def pod_event(self, pod: ServedPod, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))

    async def pod_condition(self, pod: ServedPod, status: str, reason: str, message: str) -> None:
        self.conditions.append((status, reason, message))

    async def watch_pods(self, seen: Any, gone: Any) -> None:
        raise NotImplementedError

    async def pods_on_node(self) -> list[dict[str, Any]]:
        raise NotImplementedError


@pytest.fixture
def world_readable() -> Iterator[Path]:
    """A directory uid 65532 can reach (pytest's own tmp dirs are root's alone)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run the sidecar unprivileged")
    work = Path(tempfile.mkdtemp(prefix="bento-juicefs-agent-"))
    work.chmod(0o755)
    yield work
    shutil.rmtree(work, ignore_errors=True)


def _mount_options(path: Path) -> set[str]:
    """The per-mount options of the mount on top at path (mountinfo's sixth field)."""
    target = str(path)
    options: set[str] = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if fields[4] == target:
            options = set(fields[5].split(","))
    return options


def _sidecar_env(stack: StorageStack, paths: Any, juicefs: Path, variant: str) -> dict[str, str]:
    cache_mode = "pod" if variant == "pod" else "node"
    tenant = stack.tenant
    site = next((REPO / ".venv" / "lib").glob("python3*/site-packages"))
    return {
        "PYTHONPATH": f"{REPO}:{site}",
        "PATH": os.environ["PATH"],
        "HOME": "/tmp",
        "POD_NAME": "llm-0",
        "POD_NAMESPACE": "tenant-a",
        "JFS_META_URL": tenant.meta_url,
        "JFS_ACCESS_KEY": tenant.access_key or "",
        "JFS_SECRET_KEY": tenant.secret_key or "",
        "BENTO_NAME": f"agent-{variant}",
        "BENTO_VERSION": "v1",
        "JFS_BENTO_PATH": f"/bentos/agent-{variant}/v1",
        "JFS_MOUNT_POINT": str(paths.mount_dir_path),
        "JFS_CACHE_DIR": str(paths.cache_path),
        "JFS_CACHE_MODE": cache_mode,
        "JFS_CACHE_SIZE_MIB": "1024",
        "JFS_SSD_POLICY": "off",
        "JFS_CONDITION_TYPE": "juicefs.bentoml.com/models-ready",
        "JFS_METRICS_PORT": "0",
        "JFS_JUICEFS_BIN": str(juicefs),
        "JFS_AGENT_SOCKET": str(paths.socket),
        "JFS_PRIVATE_MOUNT": str(paths.private_mount),
    }


def _local_copy(stack: StorageStack, model: Manifest, name: str, root: Path) -> LocalCopy:
    """The node agent's verified copy of a published Bento, as its warm writes it."""
    copy = LocalCopy(root)
    asyncio.run(
        stream_model(
            2,
            PublishedBento(stack.bento_dir(name, "v1")),
            list(model.files),
            time.monotonic() + 60,
            on_progress=lambda progress: None,
            on_error=lambda progress, err: None,
            copy=copy,
        )
    )
    copy.seal(model.files)
    return copy


@pytest.mark.parametrize("variant", ["pod", "node", "node-copy"])
def test_the_agent_mounts_and_the_sidecar_serves_without_privilege(
    stack: StorageStack, scratch: Path, world_readable: Path, variant: str
) -> None:
    cache_mode = "pod" if variant == "pod" else "node"
    model: Manifest = stack.publish_random(scratch, f"agent-{variant}", "v1", SMALL_SHARDS)
    juicefs = world_readable / "juicefs"
    shutil.copy2(stack.juicefs.binary, juicefs)
    juicefs.chmod(0o755)
    config = parse_config({})
    paths = pod_paths(world_readable / "kubelet", "uid-1", config)
    for volume in (paths.agent_dir, paths.mount_dir_path, paths.cache_path):
        volume.mkdir(parents=True)
        volume.chmod(0o777)  # as the kubelet makes an emptyDir
    for parent in paths.agent_dir.parents:
        if parent == world_readable:
            break
        parent.chmod(0o755)
    api = RecordingApi()
    node_cache = world_readable / "node-cache" / "models" if cache_mode == "node" else None
    bento = BentoRef("models", f"agent-{variant}", "v1") if node_cache else None
    copy = None
    if variant == "node-copy":
        copy = _local_copy(stack, model, f"agent-{variant}", world_readable / "copies" / "v1")

    def copies(ref: BentoRef, models: tuple[str, ...]) -> Path | None:
        # The node agent's choice (NodeAgent.served_copy, tested in test_local_copy).
        return None if copy is None else copy.models_dir

    pod = ServedPod(
        "tenant-a", "llm-0", "uid-1", node_cache, "juicefs.bentoml.com/models-ready", bento
    )
    command = [
        "setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
        "/usr/bin/python3", "-m", "sidecar", "run",
    ]  # fmt: skip

    stage = world_readable / "stage"
    fuse.prepare_stage(stage)

    sealed: list[tuple[BentoRef, tuple[str, ...]]] = []

    async def seal(bento: BentoRef, models: tuple[str, ...]) -> str | None:
        # The node agent's seal (NodeAgent.seal, tested on the real node): here, yes.
        sealed.append((bento, models))
        return None

    async def scenario() -> tuple[int, list[tuple[int, str]]]:
        broker = PodBroker(pod, paths, api, stage, seal, copies)
        broker.start()
        sidecar = await asyncio.create_subprocess_exec(
            *command,
            env=_sidecar_env(stack, paths, juicefs, variant),
            cwd=str(world_readable),
        )
        try:
            async with asyncio.timeout(120):
                while not any(status == "True" for status, _, _ in api.conditions):
                    assert sidecar.returncode is None, "the sidecar exited early"
                    await asyncio.sleep(0.2)
                # Node mode: the sidecar mounts after the agent's seal set the
                # condition; the app starts once the mount answers (its probe).
                while "MountReady" not in [reason for _, reason, _ in api.events]:
                    assert sidecar.returncode is None, "the sidecar exited early"
                    await asyncio.sleep(0.2)
            served = fuse_servers("tenant-a")
            # What the app sees: the published bytes, read-only; with the
            # copy, a local directory and no FUSE daemon in between.
            shown = top_mount(paths.mount_dir_path)
            assert shown is not None
            assert is_fuse(shown) == (copy is None), shown
            for entry in model.files:
                got = await asyncio.to_thread(sha256_file, paths.mount_dir_path / entry.path)
                assert got == entry.sha256, entry.path
            with pytest.raises(OSError, match="Read-only file system") as refused:
                (paths.mount_dir_path / "planted").write_bytes(b"x")
            assert refused.value.errno == errno.EROFS
            if copy is not None:  # and no program of it runs
                assert "noexec" in _mount_options(paths.mount_dir_path)
                message = next(m for status, _, m in api.conditions if status == "True")
                assert "the app reads that copy, not FUSE" in message
            if node_cache is not None and copy is None:
                # The node cache the agent lent is read-only, even to root. (A pod
                # the copy serves mounts no JuiceFS, and is lent no node cache.)
                with pytest.raises(OSError, match="Read-only file system"):
                    (paths.cache_path / "planted").write_bytes(b"x")
            sidecar.terminate()
            code = await asyncio.wait_for(sidecar.wait(), 30)
        finally:
            if sidecar.returncode is None:
                sidecar.kill()
            await broker.close(release=True)
        return code, served

    try:
        code, served = asyncio.run(scenario())
    finally:
        unmount(stage)
    print(f"events: {[reason for _, reason, _ in api.events]}; juicefs: {served}")
    assert code == 0
    # A FUSE daemon, unprivileged, serves the pod; none when the node's copy does.
    assert bool(served) == (copy is None), served
    assert all(uid == UID and caps == "0000000000000000" for uid, caps in served)
    reasons = [reason for _, reason, _ in api.events]
    assert "MountReady" in reasons
    assert "ModelsReady" in reasons
    opened = [reason for status, reason, _ in api.conditions if status == "True"]
    if bento is None:
        # Pod mode: the sidecar verified its own cache, and said so.
        assert opened == ["ModelsCached"]
        assert not sealed
    else:
        # Node mode: the gate is the agent's, from its seal; nothing verified here.
        assert opened == ["ModelsSealed"]
        assert sealed == [(bento, ())]
        # Sealed first, then mounted (or the copy shown): the client's start-up scan
        # found every block.
        assert reasons.index("ModelsReady") < reasons.index("MountReady"), reasons
    assert not is_mounted(paths.mount_dir_path)
    assert not is_mounted(paths.private_mount)
    assert not is_mounted(paths.cache_path)
