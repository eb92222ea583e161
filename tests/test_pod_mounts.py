"""The node agent's decisions about the pods it mounts for (nodeagent.podmounts); the socket's
mode on a temporary directory."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from common.agentsocket import (
    Reply,
    Request,
    parse_reply,
    receive_line_and_fd,
    render_request,
    short_name,
)
from common.mounts import unmount
from common.warm import BentoRef
from injector.config import InjectorConfig, parse_config
from nodeagent.fuse import MountFailed
from nodeagent.podmounts import PodBroker, TokenBucket, _let_anyone_connect, socket_still_bound
from nodeagent.servedpods import (
    ServedPod,
    containers_ended,
    pod_paths,
    seal_ahead,
    served_pod,
)

NODE_CACHE = "/mnt/stateful_partition/kube-ephemeral-ssd/bento-juicefs"


def _config() -> InjectorConfig:
    return parse_config({"juicefs": {"allowedVolumes": ["models", "other"]}})


BENTO_ENV = {"BENTO_NAME": "llama3", "BENTO_VERSION": "v1"}


def _pod(env: dict[str, str], agent_volume: bool = True, **status: Any) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [{"name": "juicefs-mount-dir", "emptyDir": {}}]
    if agent_volume:
        volumes.append({"name": "juicefs-agent", "emptyDir": {"medium": "Memory"}})
    return {
        "metadata": {"name": "llama-0", "namespace": "tenant-a", "uid": "5f2c-11"},
        "spec": {
            "initContainers": [
                {
                    "name": "juicefs-mount",
                    "env": [{"name": k, "value": v} for k, v in env.items()],
                }
            ],
            "volumes": volumes,
        },
        "status": status,
    }


def test_a_node_cache_pod_gets_its_volumes_directory_of_the_node_cache() -> None:
    pod = _pod({"JFS_CACHE_MODE": "node", "JFS_VOLUME": "other", **BENTO_ENV})
    served = served_pod(pod, _config())
    assert served == ServedPod(
        namespace="tenant-a",
        name="llama-0",
        uid="5f2c-11",
        node_cache=Path(NODE_CACHE) / "other",
        condition_type="juicefs.bentoml.com/models-ready",
        bento=BentoRef("other", "llama3", "v1"),
        models=(),
        seals=True,
    )


def test_a_pod_cache_pod_gets_no_node_cache() -> None:
    served = served_pod(_pod({"JFS_CACHE_MODE": "pod"}), _config())
    assert isinstance(served, ServedPod)
    assert served.node_cache is None


def test_a_pod_that_names_an_unknown_volume_or_a_path_is_not_served() -> None:
    for volume in ("secret-volume", "../../etc"):
        pod = _pod({"JFS_CACHE_MODE": "node", "JFS_VOLUME": volume, **BENTO_ENV})
        why = served_pod(pod, _config())
        assert isinstance(why, str)
        assert "not one of the configured" in why


def test_a_crafted_pod_naming_another_namespace_s_volume_gets_no_node_cache() -> None:
    """Its node cache holds the other tenant's blocks: never bound into this tenant's pod."""
    config = parse_config(
        {
            "juicefs": {
                "allowedVolumes": ["models", "other"],
                "volumeNamespaces": {"other": ["tenant-b"]},
            }
        }
    )
    pod = _pod({"JFS_CACHE_MODE": "node", "JFS_VOLUME": "other", **BENTO_ENV})
    assert served_pod(pod, config) == "volume 'other' is not one of namespace 'tenant-a''s volumes"
    pod["metadata"]["namespace"] = "tenant-b"
    assert isinstance(served_pod(pod, config), ServedPod)


def test_a_privileged_sidecar_pod_or_a_bad_environment_is_not_served() -> None:
    assert "no agent volume" in str(served_pod(_pod({}, agent_volume=False), _config()))
    assert "JFS_CACHE_MODE" in str(served_pod(_pod({"JFS_CACHE_MODE": "disk"}), _config()))
    # The Bento it reads from the node cache must be a Bento name, never a path.
    escape = _pod({"JFS_CACHE_MODE": "node", "BENTO_NAME": "../x", "BENTO_VERSION": "v1"})
    assert "BENTO_NAME" in str(served_pod(escape, _config()))


def test_the_seal_starts_ahead_of_the_sidecar_only_for_a_pod_still_waiting_for_it() -> None:
    config = _config()
    node = {"JFS_CACHE_MODE": "node", "JFS_VOLUME": "other", **BENTO_ENV}
    gate = "juicefs.bentoml.com/models-ready"

    def ahead(env: dict[str, str], **status: Any) -> bool:
        pod = _pod(env, **status)
        served = served_pod(pod, config)
        assert isinstance(served, ServedPod)
        return seal_ahead(pod, served)

    assert ahead(node)  # just bound: no status yet
    assert ahead(node, phase="Pending", conditions=[{"type": gate, "status": "False"}])
    # Its gate already open (an agent restarted under it), or its app already running.
    assert not ahead(node, phase="Pending", conditions=[{"type": gate, "status": "True"}])
    assert not ahead(node, phase="Running")
    # Its sidecar never asks: no warmup, or the pod's own cache.
    assert not ahead({**node, "JFS_WARMUP": "false"})
    assert not ahead({"JFS_CACHE_MODE": "pod", "JFS_VOLUME": "other"})
    deleted = _pod(node)
    deleted["metadata"]["deletionTimestamp"] = "2026-12-07T10:00:00Z"
    served = served_pod(deleted, config)
    assert isinstance(served, ServedPod)
    assert not seal_ahead(deleted, served)


def test_pod_paths_are_the_kubelets_empty_dirs() -> None:
    paths = pod_paths(Path("/var/lib/kubelet"), "5f2c-11", _config())
    volumes = Path("/var/lib/kubelet/pods/5f2c-11/volumes/kubernetes.io~empty-dir")
    assert paths.socket == volumes / "juicefs-agent" / "agent.sock"
    assert paths.private_mount == volumes / "juicefs-agent" / "volume"
    assert paths.mount_dir_path == volumes / "juicefs-mount-dir"
    assert paths.cache_path == volumes / "juicefs-cache"


def test_containers_ended() -> None:
    running: dict[str, Any] = {"state": {"running": {}}}
    done = {"state": {"terminated": {"exitCode": 0}}}
    assert containers_ended(_pod({}, phase="Succeeded"))
    assert not containers_ended(_pod({}, phase="Running", containerStatuses=[done]))
    deleting = _pod({}, phase="Running", initContainerStatuses=[done], containerStatuses=[done])
    deleting["metadata"]["deletionTimestamp"] = "2026-12-06T03:00:00Z"
    assert containers_ended(deleting)
    deleting["status"]["initContainerStatuses"] = [running]
    assert not containers_ended(deleting)
    # The sidecar ended on its way out; the app never started (its mount never came).
    waiting = {"state": {"waiting": {"reason": "PodInitializing"}}}
    deleting["status"]["initContainerStatuses"] = [done]
    deleting["status"]["containerStatuses"] = [waiting]
    assert containers_ended(deleting)
    # Not deleted: a waiting app may still start.
    del deleting["metadata"]["deletionTimestamp"]
    assert not containers_ended(deleting)


def test_a_sidecar_posts_a_burst_of_events_then_one_a_second() -> None:
    bucket = TokenBucket(burst=3, rate=1.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(1.0)
    assert not bucket.take(1.1)


def test_the_socket_is_opened_to_the_sidecar_never_what_a_symlink_names(tmp_path: Path) -> None:
    """The sidecar can write in the directory of its socket: a symlink planted there in
    place of the socket must not make the agent chmod the file it names."""
    target = tmp_path / "host-file"
    target.write_text("secret")
    target.chmod(0o600)
    planted = tmp_path / "agent.sock"
    planted.symlink_to(target)
    # O_PATH | O_NOFOLLOW opens the symlink itself, which is no socket.
    with pytest.raises(MountFailed, match="is not the agent"):
        _let_anyone_connect(planted)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    planted.unlink()
    planted.write_text("not a socket")
    with pytest.raises(MountFailed, match="is not the agent"):
        _let_anyone_connect(planted)
    planted.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(planted))
        os.chmod(planted, 0o600)
        _let_anyone_connect(planted)
        assert stat.S_IMODE(planted.stat().st_mode) == 0o666
    finally:
        listener.close()


def _mount_tmpfs(directory: Path) -> None:
    """What the kubelet does for an emptyDir of medium Memory, once the directory exists."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)], check=True)


def test_a_socket_hidden_by_a_mount_or_replaced_is_no_longer_bound(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        bound = _let_anyone_connect(path)
        assert socket_still_bound(path, bound)
        _mount_tmpfs(tmp_path)
        try:
            assert not socket_still_bound(path, bound)  # the tmpfs hides it
        finally:
            unmount(tmp_path)
        assert socket_still_bound(path, bound)
        path.unlink()
        assert not socket_still_bound(path, bound)
        path.write_text("planted")
        assert not socket_still_bound(path, bound)
    finally:
        listener.close()


class _NoApi:
    async def pod_event(self, pod: ServedPod, kind: str, reason: str, message: str) -> None:
        return None

    async def pod_condition(self, pod: ServedPod, status: str, reason: str, message: str) -> None:
        return None


async def _socket_appears(path: Path) -> None:
    async with asyncio.timeout(10):
        while not await asyncio.to_thread(path.exists):  # noqa: ASYNC110 (no event says when)
            await asyncio.sleep(0.05)


def test_a_broker_binds_again_when_the_kubelet_mounts_the_volume_over_its_socket(
    tmp_path: Path,
) -> None:
    """The kubelet makes an emptyDir's directory, then mounts its tmpfs (medium Memory) on
    it: a socket the agent bound in between is hidden, and the sidecar would wait for it
    in vain. The broker notices and binds again, on the tmpfs."""
    paths = pod_paths(tmp_path / "kubelet", "uid-1", _config())
    paths.agent_dir.mkdir(parents=True)
    pod = ServedPod("tenant-a", "llm-0", "uid-1", None, "juicefs.bentoml.com/models-ready", None)

    async def scenario() -> None:
        broker = PodBroker(pod, paths, _NoApi(), tmp_path / "stage")  # type: ignore[arg-type]
        broker.start()
        try:
            await _socket_appears(paths.socket)
            _mount_tmpfs(paths.agent_dir)
            try:
                await _socket_appears(paths.socket)  # bound again, on the tmpfs
                # A request answered on the new socket (an Event: the pod's own say).
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    with short_name(paths.socket) as name:
                        await asyncio.to_thread(client.connect, name)
                    request = render_request(Request("event", "Normal", "Test", "hello"))
                    await asyncio.to_thread(client.sendall, request)
                    line, _ = await asyncio.to_thread(receive_line_and_fd, client)
                    assert parse_reply(line) == Reply()
                finally:
                    client.close()
            finally:
                await broker.close(release=False)
                unmount(paths.agent_dir)
        finally:
            await broker.close(release=False)

    asyncio.run(scenario())


def _ask(path: Path, request: Request) -> Reply:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_name(path) as name:
            client.connect(name)
        client.sendall(render_request(request))
        line, _ = receive_line_and_fd(client)
        return parse_reply(line)
    finally:
        client.close()


def test_a_seal_started_ahead_answers_the_sidecar_and_is_not_run_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warm runs from the moment the pod is seen; the sidecar's seal request waits for
    that one, and the reply says the node's copy serves the models. Sealed, the copy is
    read into the page cache at once, and once per pod."""
    prefetched: list[Path] = []
    monkeypatch.setattr("nodeagent.podmounts.prefetch", prefetched.append)
    paths = pod_paths(tmp_path / "kubelet", "uid-1", _config())
    paths.agent_dir.mkdir(parents=True)
    bento = BentoRef("models", "llama3", "v1")
    pod = ServedPod("tenant-a", "llm-0", "uid-1", None, "models-ready", bento, seals=True)
    calls: list[BentoRef] = []

    async def scenario() -> None:
        warmed = asyncio.Event()

        async def sealer(ref: BentoRef, models: tuple[str, ...]) -> str | None:
            calls.append(ref)
            await warmed.wait()
            return None

        broker = PodBroker(
            pod,
            paths,
            _NoApi(),  # type: ignore[arg-type]
            tmp_path / "stage",
            sealer,
            lambda ref, models: tmp_path / "copy" / "models",
        )
        broker.start(seal_ahead=True)
        try:
            await asyncio.sleep(0)
            assert calls == [bento]  # under way before any request
            await _socket_appears(paths.socket)
            asked = asyncio.ensure_future(asyncio.to_thread(_ask, paths.socket, Request("seal")))
            await asyncio.sleep(0.2)
            assert not asked.done()  # it waits for the warm already running
            warmed.set()
            assert await asked == Reply(served_copy=True)
            assert calls == [bento]
            # A sidecar restarted later is sealed afresh.
            assert await asyncio.to_thread(_ask, paths.socket, Request("seal")) == Reply(
                served_copy=True
            )
            assert calls == [bento, bento]
            assert prefetched == [tmp_path / "copy" / "models"]
        finally:
            await broker.close(release=False)

    asyncio.run(scenario())


def test_a_pod_gone_before_its_sidecar_asked_cancels_the_seal_ahead(tmp_path: Path) -> None:
    paths = pod_paths(tmp_path / "kubelet", "uid-1", _config())
    bento = BentoRef("models", "llama3", "v1")
    pod = ServedPod("tenant-a", "llm-0", "uid-1", None, "models-ready", bento, seals=True)

    async def scenario() -> None:
        cancelled = asyncio.Event()

        async def sealer(ref: BentoRef, models: tuple[str, ...]) -> str | None:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return None

        broker = PodBroker(pod, paths, _NoApi(), tmp_path / "stage", sealer)  # type: ignore[arg-type]
        broker.start(seal_ahead=True)
        await asyncio.sleep(0)
        await broker.close(release=False)
        assert cancelled.is_set()

    asyncio.run(scenario())
