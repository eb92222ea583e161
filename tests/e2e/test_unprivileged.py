"""Unprivileged sidecars on the real node: the node agent mounts, the pod holds no privilege.

The injected `juicefs-mount` runs as uid
65532 with no capabilities and no service-account token; the node agent
(the DaemonSet, privileged, in bento-juicefs-system) opens /dev/fuse,
mounts into the pod's own emptyDir on the node, hands the descriptor over
the pod's socket, binds the models read-only for the app, and sets the
readiness condition when the sidecar has verified the model. So a Bento
runs in a namespace that enforces Pod Security `baseline`, and a
restricted-ready one under `restricted`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from devcluster import Cluster, wait_for
from devcluster.installs.node_agent import LocalNodeAgent
from devcluster.node.host import copied_bytes, local_copies_dir, node_cache_dir
from devcluster.node.node import Node
from devcluster.storage.minio_metrics import store_requests
from devcluster.storage.stack import MIB, StorageStack
from modelstore.manifest import Manifest
from tests.e2e.pods import (
    GATE,
    MODELS_PATH,
    SIDECAR,
    bento_labels,
    checking_pod,
    condition,
    create_pod,
    events,
    exec_in,
    is_ready,
    namespace_enforcing,
    reasons,
    run_until_ready,
    wait_pod,
)
from tests.helpers import fuse_servers

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bento-deployment.yaml"

BENTO = "unpriv-llm"
VERSION = "v1"
SHARDS = [16 * MIB, 8 * MIB]
LABELS = bento_labels(BENTO, VERSION)


@pytest.fixture(scope="module")
def model(storage: StorageStack, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return storage.publish_random(tmp_path_factory.mktemp("unpriv"), BENTO, VERSION, SHARDS)


def bento_pod(name: str, model: Manifest, restricted: bool, cache_mode: str) -> dict[str, Any]:
    shard = max(model.files, key=lambda f: f.size)
    annotations = {"juicefs.bentoml.com/cache-mode": cache_mode}
    return checking_pod(
        name,
        LABELS,
        shard.path,
        shard.sha256,
        restricted=restricted,
        annotations=annotations,
    )


def mount_options(mountinfo: str) -> dict[str, set[str]]:
    """Each mount point's per-mount options, the top mount's where several are stacked."""
    options: dict[str, set[str]] = {}
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 5:
            options[fields[4]] = set(fields[5].split(","))
    return options


def assert_unprivileged(pod: dict[str, Any]) -> None:
    spec = pod["spec"]
    assert not [v["name"] for v in spec.get("volumes", []) if "hostPath" in v]
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        context = container.get("securityContext") or {}
        assert not context.get("privileged"), container["name"]
    sidecar = next(c for c in spec["initContainers"] if c["name"] == SIDECAR)
    context = sidecar["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] != 0
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    # No token: the token's path holds an empty directory of the sidecar's own volume.
    at_token = [
        m["name"]
        for m in sidecar.get("volumeMounts", [])
        if m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    ]
    assert at_token == ["juicefs-agent"]


@pytest.mark.parametrize(
    ("level", "restricted", "cache_mode"),
    [("baseline", False, "node"), ("restricted", True, "pod")],
)
def test_a_bento_turns_ready_under_pod_security_without_privilege(
    cluster: Cluster,
    node: Node,
    node_agent: LocalNodeAgent,
    model: Manifest,
    level: str,
    restricted: bool,
    cache_mode: str,
) -> None:
    namespace = namespace_enforcing(cluster, level, "e2e-unpriv")
    try:
        pod = run_until_ready(cluster, namespace, bento_pod("llm", model, restricted, cache_mode))
        assert_unprivileged(pod)
        gate = condition(pod, GATE)
        assert gate is not None
        assert gate["status"] == "True", gate
        seen = reasons(cluster, namespace, "llm")
        print(f"{level}: events {seen}")
        assert "MountReady" in seen
        assert "ModelsReady" in seen
        # What the sidecar sees the agent mount: the model read-only; pod mode: its
        # private FUSE mount nosuid and nodev.
        code, mountinfo = exec_in(cluster, namespace, "llm", SIDECAR, "cat", "/proc/self/mountinfo")
        assert code == 0, mountinfo
        options = mount_options(mountinfo)
        print(f"{level}: sidecar mounts {options}")
        assert "ro" in options["/var/lib/juicefs/mnt"]
        served = fuse_servers(namespace)
        print(f"juicefs serving pods: {served}")
        if cache_mode == "node":
            # Sealed from the agent's verified copy: bound read-only and noexec, and
            # neither a FUSE mount nor a juicefs process in the pod.
            assert {"ro", "nosuid", "nodev", "noexec"} <= options["/var/lib/juicefs/mnt"]
            assert "/run/bento-juicefs/agent/volume" not in options
            assert served == []
        else:
            assert {"nosuid", "nodev"} <= options["/run/bento-juicefs/agent/volume"]
            assert served
            assert all(uid != 0 and caps == "0000000000000000" for uid, caps in served)
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_a_second_pod_on_a_warm_node_opens_its_gate_from_the_seal(
    cluster: Cluster, node: Node, node_agent: LocalNodeAgent, model: Manifest
) -> None:
    """Node cache mode: the node agent warmed and verified the Bento once (for the first
    pod, on demand); a second pod's gate opens from that seal, nothing hashed again."""
    namespace = namespace_enforcing(cluster, "baseline", "e2e-unpriv")
    try:
        first = run_until_ready(cluster, namespace, bento_pod("first", model, False, "node"))
        second = run_until_ready(cluster, namespace, bento_pod("second", model, False, "node"))
        for pod in (first, second):
            gate = condition(pod, GATE)
            assert gate is not None
            assert gate["reason"] == "ModelsSealed", gate
            print(f"{pod['metadata']['name']}: {gate['message']}")
        seen = reasons(cluster, namespace, "second")
        assert "ModelsReady" in seen
        assert "WarmupStarted" in seen
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_restarting_the_agent_leaves_the_mounts_serving(
    cluster: Cluster, node: Node, node_agent: LocalNodeAgent, model: Manifest
) -> None:
    """The mounts live in the node's mount namespace and the FUSE descriptor is the
    sidecar's: the agent's pod deleted (the DaemonSet makes a new one), the app still
    reads its model; the new agent serves a new pod, and unmounts the old one's when it
    is deleted, so the kubelet tears its volumes down and the pod goes."""
    namespace = namespace_enforcing(cluster, "baseline", "e2e-unpriv")
    try:
        run_until_ready(cluster, namespace, bento_pod("before", model, False, "node"))
        old = node_agent.running_pod()
        new = node_agent.restart()
        print(f"node agent {old} deleted, {new} runs")
        shard = max(model.files, key=lambda f: f.size)
        code, said = exec_in(
            cluster, namespace, "before", "main", "sha256sum", f"{MODELS_PATH}/{shard.path}"
        )
        assert code == 0, said
        assert said.split()[0] == shard.sha256
        run_until_ready(cluster, namespace, bento_pod("after", model, False, "node"))
        cluster.kubectl("delete", "pod", "before", "-n", namespace, "--wait=true", timeout=120)
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_a_warm_interrupted_by_an_agent_restart_completes(
    cluster: Cluster,
    node: Node,
    storage: StorageStack,
    node_agent: LocalNodeAgent,
    tmp_path: Path,
) -> None:
    """The agent's pod deleted while it warms a cold Bento for a pod's seal: the sidecar
    asks the new agent again (on a new connection, or after SealInterrupted when none
    came in time), which warms the Bento again; the gate opens from its seal. What the
    store sent to the new agent, against what was missing when it started, is printed."""
    name = "resumed-llm"
    big = storage.publish_random(tmp_path, name, VERSION, [128 * MIB] * 8)
    shard = max(big.files, key=lambda f: f.size)
    copies = local_copies_dir(node_cache_dir(node.dir), storage.volume_name)

    def on_node() -> int:
        """What the agent's copies hold: files kept, and what is written of those in flight."""
        return copied_bytes(copies, staged=True)

    held_before = on_node()
    namespace = namespace_enforcing(cluster, "baseline", "e2e-unpriv")
    try:
        before = store_requests(storage.store)
        pod = checking_pod(
            "resumed", bento_labels(name, VERSION), shard.path, shard.sha256,
            annotations={"juicefs.bentoml.com/cache-mode": "node"},
        )  # fmt: skip
        create_pod(cluster, namespace, pod)
        wait_for(
            lambda: on_node() - held_before >= big.total_bytes // 5,
            timeout=180,
            interval=0.1,
            what="a fifth of the model warmed",
        )
        warmed = on_node() - held_before
        old = node_agent.running_pod()
        new = node_agent.restart()
        # The old agent is gone now (the DaemonSet starts its successor only then):
        # what is on disk here is what the new one finds.
        held = on_node() - held_before
        at_restart = store_requests(storage.store)
        print(f"agent {old} deleted with {warmed / MIB:.0f} MiB of {big.total_bytes / MIB:.0f} "
              f"MiB warmed, {held / MIB:.0f} MiB when it was gone; {new} runs")  # fmt: skip
        ready = wait_pod(cluster, namespace, "resumed", is_ready, timeout=300, what="Ready")
        fetched = (store_requests(storage.store) - before).bytes_sent
        after = (store_requests(storage.store) - at_restart).bytes_sent
        missing = big.total_bytes - held
        seen = reasons(cluster, namespace, "resumed")
        print(f"the store sent {fetched / MIB:.0f} MiB for a {big.total_bytes / MIB:.0f} MiB "
              f"model, {after / MIB:.0f} MiB of it to the new agent, which found "
              f"{missing / MIB:.0f} MiB missing; Events: {seen}")  # fmt: skip
        gate = condition(ready, GATE)
        assert gate is not None
        said = [f"{e['reason']}: {e['message']}" for e in events(cluster, namespace, "resumed")]
        assert gate["reason"] == "ModelsSealed", (gate, said)
        assert "SealFailed" not in seen, said
        # Printed, not asserted (a figure, not a timing): measured 1088 MiB fetched
        # with 784 MiB missing, where a cold warm fetches 1.25x the model and
        # starting over would be about 1.25x the whole (docs/node-agent.md).
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_the_unchanged_example_turns_ready_in_a_baseline_namespace(
    cluster: Cluster, node: Node, node_agent: LocalNodeAgent, example_model: Manifest
) -> None:
    """examples/bento-deployment.yaml as a user applies it (only its namespace is this
    test's own, and one replica: the node has one GPU), in a namespace that enforces
    baseline: Ready through the gate, sealed by the agent, nothing privileged."""
    namespace = namespace_enforcing(cluster, "baseline", "e2e-example")
    try:
        docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
        for doc in docs:
            doc["metadata"]["namespace"] = namespace
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        deployment["spec"]["replicas"] = 1
        applied = cluster.kubectl(
            "apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs), check=False
        )
        assert applied.returncode == 0, applied.stderr
        selector = f"yatai.ai/bento-deployment={deployment['metadata']['name']}"

        def ready() -> dict[str, Any] | None:
            pods = cluster.get_json("pods", "-n", namespace, "-l", selector)["items"]
            return next((p for p in pods if is_ready(p)), None)

        # The GPU may still be held by the previous example's pod, on its way out.
        pod = wait_for(ready, timeout=420, what="the example's pod Ready")
        assert_unprivileged(pod)
        gate = condition(pod, GATE)
        assert gate is not None
        name = pod["metadata"]["name"]
        said = [f"{e['reason']}: {e['message']}" for e in events(cluster, namespace, name)]
        assert gate["reason"] == "ModelsSealed", (gate, said)
        print(f"example: {gate['message']}")
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
