"""The sidecar under faults on the real node (issue 12).

- The apiserver cut off from the node agent (an iptables DROP in the node,
  for the agent pod's IP only) while a pod's sidecar asks it to set the
  condition (the sidecar holds no credential: the agent reports for it):
  the sidecar verifies the model meanwhile, asks again, and the condition
  is set once the path is back.
- The pod deleted mid-warmup, while its reads hang on an object store cut
  off from it: the sidecar unmounts, the pod is gone within its grace
  period, no FUSE mount is left in the node's mountinfo.
- juicefs killed under a running app: the sidecar remounts it in place.
- The node cache directory full (a 48 MiB tmpfs with 2 MiB free mounted on
  the volume's node cache path inside the node): the node agent cannot
  seal the Bento there, the sidecar says the disk is full (CacheDiskFull),
  serves the model from the object store, and opens the gate only once
  every byte is verified by itself (reason ModelsVerified).

Each prints its figures (retries, seconds, bytes) for the closing note.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from devcluster import Cluster, wait_for
from devcluster.images import SAMPLE_BENTO_IMAGE
from devcluster.installs.node_agent import LocalNodeAgent
from devcluster.node.faults import FullDirectory, PathCut
from devcluster.node.host import local_copies_dir, node_cache_dir
from devcluster.node.node import Node
from devcluster.storage.juicefs import cached_blocks
from devcluster.storage.stack import MIB, PATH_TEMPLATE, StorageStack, write_random_model
from modelstore.manifest import MANIFEST_NAME, MODELS_DIR, Manifest, build_manifest, sha256_file
from modelstore.publish import bento_dir
from tests.e2e.pods import (
    GATE,
    MODELS_PATH,
    SIDECAR,
    apiserver,
    bento_labels,
    check_command,
    checking_container,
    condition,
    container_status,
    diagnose,
    events,
    exec_in,
    get_pod,
    is_ready,
    juicefs_pids,
    logs,
    opted_in_namespace,
    pod_cache_dir,
    pod_manifest,
    reasons,
    wait_event,
    wait_pod,
)

VERSION = "v1"


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """An opted-in namespace of the test's own (credentials and RBAC provisioned)."""
    with opted_in_namespace(cluster, "e2e-faults") as name:
        yield name


def _juicefs_mounts(node: Node, uid: str) -> list[Path]:
    return [m for m in node.mounts("fuse.juicefs") if uid in str(m)]


def _pod_ip(cluster: Cluster, namespace: str, name: str) -> tuple[str, str]:
    pod = wait_pod(
        cluster, namespace, name, lambda p: bool(p.get("status", {}).get("podIP")),
        timeout=60, what=f"pod {name} to get an IP",
    )  # fmt: skip
    return str(pod["status"]["podIP"]), str(pod["metadata"]["uid"])


def _apply(cluster: Cluster, namespace: str, pod: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))


def stage_unpublished(
    storage: StorageStack, scratch: Path, name: str, shards: list[int]
) -> Callable[[], Manifest]:
    """The Bento's models/ on the volume without its manifest; the returned call writes it.

    The sidecar mounts, then waits for manifest.json (WaitingForManifest):
    the test decides when the model may be streamed.
    """
    source = write_random_model(scratch / f"src-{name}", shards)
    target = bento_dir(storage.writer_mount, PATH_TEMPLATE, name, VERSION)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target / MODELS_DIR)
    shutil.rmtree(scratch / f"src-{name}", ignore_errors=True)

    def publish_manifest() -> Manifest:
        manifest = build_manifest(target / MODELS_DIR, f"{name}:{VERSION}")
        tmp = target / ".manifest.tmp"
        tmp.write_text(manifest.model_dump_json(indent=2))
        os.replace(tmp, target / MANIFEST_NAME)
        return manifest

    return publish_manifest


# -- 1. the apiserver unreachable while the condition is set -------------------------------


def test_the_condition_is_retried_while_the_agent_is_cut_off_and_set_once_it_is_back(
    cluster: Cluster,
    node: Node,
    node_agent: LocalNodeAgent,
    namespace: str,
    storage: StorageStack,
    tmp_path: Path,
) -> None:
    name = "apiserver-cut"
    publish_manifest = stage_unpublished(storage, tmp_path, name, [16 * MIB] * 2)
    # The app reads the shard once the sidecar's startup probe passes (the mount).
    shard_dir = bento_dir(storage.writer_mount, PATH_TEMPLATE, name, VERSION) / MODELS_DIR
    shard = sorted(shard_dir.rglob("*.safetensors"))[-1]
    app = {
        "name": "main",
        "image": SAMPLE_BENTO_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": check_command(str(shard.relative_to(shard_dir)), sha256_file(shard)),
    }
    # A pod cache: this sidecar verifies the model itself, then asks for the condition.
    pod = pod_manifest(
        name, bento_labels(name, VERSION), {"containers": [app]},
        **{"juicefs.bentoml.com/cache-mode": "pod"},
    )  # fmt: skip
    _apply(cluster, namespace, pod)
    _, uid = _pod_ip(cluster, namespace, name)
    agent_pod = node_agent.ensure_running()
    agent_ip = cluster.get_json("pod", agent_pod, "-n", "bento-juicefs-system")["status"]["podIP"]
    server = urlparse(apiserver(cluster)[0])
    assert server.hostname is not None
    assert server.port is not None
    assert node.network is not None

    with PathCut(node.network, agent_ip, server.hostname, server.port) as cut:
        cut_at = time.monotonic()
        # Nothing to stream until the manifest is there: the cut is in place first.
        publish_manifest()

        def retried() -> int | None:
            text = logs(cluster, namespace, name)
            verified = "warmup.done" in text
            count = text.count("condition.retry")
            return count if verified and count >= 2 else None

        retries_during = wait_for(retried, timeout=240, interval=1, what="2 condition retries")
        held = get_pod(cluster, namespace, name)
        assert not is_ready(held), diagnose(cluster, namespace, name)
        assert (condition(held, GATE) or {}).get("status") != "True"
        dropped = cut.dropped_packets()
        assert dropped > 0
        cut_seconds = time.monotonic() - cut_at
    back_at = time.monotonic()
    ready = wait_pod(cluster, namespace, name, is_ready, timeout=180, what="Ready once back")
    back_seconds = time.monotonic() - back_at

    gate = condition(ready, GATE)
    assert gate is not None
    assert gate["status"] == "True"
    assert gate["reason"] == "ModelsCached"
    text = logs(cluster, namespace, name)
    retries = text.count("condition.retry")
    assert text.index("warmup.done") < text.index("condition.retry")  # verified, then retried
    assert "condition.set" in text
    print(
        f"apiserver cut off from the node agent {agent_ip} for {cut_seconds:.1f}s ({dropped} "
        f"packets dropped): the model was verified meanwhile, the condition asked again "
        f"{retries} times ({retries_during} while cut), and was set {back_seconds:.1f}s after "
        f"the path was back; Events that reached the apiserver: "
        f"{reasons(cluster, namespace, name)}"
    )
    cluster.kubectl("delete", "pod", name, "-n", namespace, "--wait=true", timeout=60)
    assert not _juicefs_mounts(node, uid)


# -- 3. SIGTERM during warmup ----------------------------------------------------------------


@pytest.mark.parametrize("app_kind", ["idle", "reading"])
def test_a_pod_deleted_mid_warmup_unmounts_and_exits_cleanly(
    cluster: Cluster,
    node: Node,
    namespace: str,
    storage: StorageStack,
    tmp_path: Path,
    app_kind: str,
) -> None:
    """idle: the app ends on SIGTERM at once, so the sidecar is stopped right away and
    the pod is gone within its grace period. reading: the app hangs reading the model
    through the mount (the store is cut off), so the kubelet SIGKILLs it at the end of
    the grace period and then gives the sidecar 2 s: it must still unmount and exit 0.
    """
    name = f"sigterm-{app_kind}"
    model = storage.publish_random(tmp_path, name, VERSION, [64 * MIB] * 4)
    grace = 20
    trap = "trap 'exit 0' TERM; sleep 3600 & wait"
    if app_kind == "idle":
        app = {
            "name": "main",
            "image": SAMPLE_BENTO_IMAGE,
            "imagePullPolicy": "IfNotPresent",
            "command": ["sh", "-c", trap],
        }
    else:
        app = checking_container(model, then=trap)
    pod = pod_manifest(
        name, bento_labels(name, VERSION), {"containers": [app]},
        **{"juicefs.bentoml.com/cache-mode": "pod"},
    )  # fmt: skip
    pod["spec"]["terminationGracePeriodSeconds"] = grace
    _apply(cluster, namespace, pod)
    ip, uid = _pod_ip(cluster, namespace, name)
    cache = pod_cache_dir(node.dir, uid)
    assert node.network is not None
    store = PathCut(node.network, ip, storage.store.host, storage.store.port)
    try:
        # Cut the store once the stream is under way: its reads then hang in FUSE.
        wait_for(
            lambda: sum(cached_blocks(cache).values()) >= model.total_bytes // 10,
            timeout=120,
            interval=0.02,
            what="10% of the model in the pod's cache",
        )
        store.start()
        cached = sum(cached_blocks(cache).values())
        time.sleep(3)
        before = get_pod(cluster, namespace, name)
        assert not is_ready(before)
        assert "ModelsReady" not in reasons(cluster, namespace, name)
        mounts_before = _juicefs_mounts(node, uid)
        assert mounts_before, "the sidecar's JuiceFS mounts are in the node's mountinfo"

        started = time.monotonic()
        cluster.kubectl("delete", "pod", name, "-n", namespace, "--wait=false")
        last_sidecar: dict[str, Any] = {}
        while time.monotonic() - started < grace + 30:
            proc = cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
            if proc.returncode != 0:
                break  # NotFound: gone
            for status in (
                json.loads(proc.stdout).get("status", {}).get("initContainerStatuses") or []
            ):
                if status["name"] == SIDECAR:
                    last_sidecar = status
            time.sleep(0.2)
        gone = time.monotonic() - started
    finally:
        store.stop()
    terminated = (last_sidecar.get("state") or {}).get("terminated") or {}
    seen_state = {k: v for k, v in terminated.items() if k in ("exitCode", "reason")}
    print(
        f"pod ({app_kind} app) deleted mid-warmup ({cached / MIB:.0f} of "
        f"{model.total_bytes / MIB:.0f} MiB cached, the sidecar's reads hanging on a cut-off "
        f"store): gone in {gone:.1f}s (grace {grace}s); sidecar terminated "
        f"{seen_state or last_sidecar.get('state')}; {len(mounts_before)} JuiceFS mounts before"
    )
    if app_kind == "idle":
        assert gone < grace, f"the pod took {gone:.1f}s to go (grace {grace}s)"
    if terminated:  # seen before the pod went: a clean exit, not the kubelet's SIGKILL (137)
        assert terminated.get("exitCode") == 0, terminated
    wait_for(lambda: not _juicefs_mounts(node, uid), timeout=30, what="no JuiceFS mount left")
    seen = reasons(cluster, namespace, name)
    assert "Unmounted" in seen, seen  # the sidecar unmounted, not the kubelet's SIGKILL
    assert "ModelsReady" not in seen, seen
    assert "Ready" not in seen, seen


def test_a_killed_juicefs_is_remounted_into_the_running_app(
    cluster: Cluster, node: Node, namespace: str, storage: StorageStack, tmp_path: Path
) -> None:
    """juicefs dies (supervisor and worker, as an OOM kill would): the sidecar remounts.

    A pod that reads FUSE (its own cache here; on the node cache, one the
    node's copy does not serve). Until the remount the app's model dir is a
    dead FUSE connection ("Transport endpoint is not connected"). The sidecar
    mounts again over the dead mount in its own container, which is what
    propagates into the running app container (a restarted sidecar container
    could not reach the app's view; see modelstore/mount.py), so neither
    container restarts.
    """
    name = "killed-juicefs"
    model = storage.publish_random(tmp_path, name, VERSION, [32 * MIB] * 2)
    # An app that only waits: one still reading the model when juicefs is killed
    # would fail its read and be restarted, which is not what this test is about.
    idle = {
        "name": "main",
        "image": SAMPLE_BENTO_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", "exec sleep 3600"],
    }
    pod = pod_manifest(
        name, bento_labels(name, VERSION), {"containers": [idle]},
        **{"juicefs.bentoml.com/cache-mode": "pod"},
    )  # fmt: skip
    _apply(cluster, namespace, pod)
    ready = wait_pod(cluster, namespace, name, is_ready, timeout=180, what=f"pod {name} Ready")
    uid = str(ready["metadata"]["uid"])
    pids = juicefs_pids(uid)
    assert pids, "juicefs runs in the sidecar"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    code, meanwhile = exec_in(cluster, namespace, name, "main", "ls", MODELS_PATH)
    print(f"the app right after the kill (exit {code}): {meanwhile.strip()[:200]!r}")
    died = wait_event(cluster, namespace, name, "MountDied", timeout=60)
    assert died["type"] == "Warning"
    recovered = wait_event(cluster, namespace, name, "MountRecovered", timeout=120)
    print(f"MountRecovered: {recovered['message']}")
    shard = max(model.files, key=lambda f: f.size)
    code, output = exec_in(
        cluster, namespace, name, "main", "sha256sum", f"{MODELS_PATH}/{shard.path}"
    )
    assert code == 0, f"{output}\n{diagnose(cluster, namespace, name)}"
    assert output.split()[0] == shard.sha256
    pod_now = get_pod(cluster, namespace, name)
    assert is_ready(pod_now)
    assert container_status(pod_now, SIDECAR)["restartCount"] == 0
    assert container_status(pod_now, "main")["restartCount"] == 0
    assert len(juicefs_pids(uid)) >= 1


# -- 4. the node cache directory full ----------------------------------------------------------


def test_a_full_node_cache_disk_is_reported_and_the_model_served_verified_from_the_store(
    cluster: Cluster,
    node: Node,
    node_agent: LocalNodeAgent,
    namespace: str,
    storage: StorageStack,
    tmp_path: Path,
) -> None:
    name = "cache-disk-full"
    model = storage.publish_random(tmp_path, name, VERSION, [8 * MIB] * 3)
    volume_cache = node_cache_dir(node.dir) / storage.volume_name
    # The whole node cache disk full: the volume's blocks and the agent's local copies.
    copies = local_copies_dir(node_cache_dir(node.dir), storage.volume_name)
    copies_full = FullDirectory(node.mount_ns, copies, size_mib=48, free_mib=2).start()
    try:
        full = FullDirectory(node.mount_ns, volume_cache, size_mib=48, free_mib=2).start()
    except BaseException:
        copies_full.stop()
        raise
    # The agent's hostPath of the node cache is what the node had mounted when
    # its pod started: a new pod sees the full disk (and one after, the real one).
    node_agent.restart()
    try:
        total, free_before = full.space()
        pod = pod_manifest(
            name, bento_labels(name, VERSION), {"containers": [checking_container(model)]}
        )
        _apply(cluster, namespace, pod)
        ready = wait_pod(cluster, namespace, name, is_ready, timeout=240, what=f"{name} Ready")
        assert not [v for v in ready["spec"]["volumes"] if v.get("hostPath")]
        _, free_after = full.space()
        cached_files = [f for f in full.files() if "/raw/chunks/" in f]

        gate = condition(ready, GATE)
        assert gate is not None
        assert gate["status"] == "True"
        assert gate["reason"] == "ModelsVerified", gate
        assert "cache disk is full" in gate["message"]
        found = {e["reason"]: e for e in events(cluster, namespace, name)}
        seen = reasons(cluster, namespace, name)
        assert seen.index("CacheDiskFull") < seen.index("ModelsReady") < seen.index("Ready")
        assert found["CacheDiskFull"]["type"] == "Warning"
        full_message = found["CacheDiskFull"]["message"]
        assert "MiB free of 48 MiB" in full_message
        assert "read from the object store" in full_message
        ready_message = found["ModelsReady"]["message"]
        assert "from the object store" in ready_message
        assert "files verified" in ready_message
        assert seen.index("SealFailed") < seen.index("VerifyingUnsealed") < seen.index("Ready")
        text = logs(cluster, namespace, name)
        assert "cache.full" in text
        out = cluster.kubectl("logs", name, "-n", namespace, "-c", "main").stdout
        assert "verified" in out  # the app read the published bytes through the mount
        print(
            f"node cache dir full ({free_before / MIB:.1f} MiB free of {total / MIB:.0f} MiB, "
            f"{free_after / MIB:.1f} MiB after; {len(cached_files)} blocks cached): "
            f"CacheDiskFull: {full_message}\nModelsReady: {ready_message}\n"
            f"juicefs said so: {'juicefs.cache_full' in text}"
        )
        cluster.kubectl("delete", "pod", name, "-n", namespace, "--wait=true", timeout=60)
    finally:
        full.stop()
        copies_full.stop()
        node_agent.restart()


pytestmark = pytest.mark.usefixtures("local_only")
