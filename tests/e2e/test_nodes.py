"""Several real nodes of one GPU pool: placement on warm nodes, a scale-up, a drain, a join.

The local cluster gets two more real nodes for this module (`ControlPlane.add_node`:
each its own network namespace, containerd, kubelet, node cache and node agent),
which leave again at its end. Each node has one GPU, as a g2-standard-8 does, and
every Bento pod here asks for it, so one replica fits a node, as on a real GPU pool.
Against $E2E_KUBECONFIG the module runs where the cluster has three such nodes.

The story, in order:
- a first replica makes its node warm (the agent warms on demand and labels it);
- ten placements of a new replica one after another: each lands on the warm node;
- with room for two there, ten times a Deployment's second replica: each joins
  the first on the warm node, against the scheduler's default spreading;
- a scale-up from 0 to 3: a replica per node, each Ready through the gate after
  checking the model's sha256 against the published one, each node warm after;
- a drain of a node with a replica: its replica starts on another node and the
  drained node keeps no mount for it;
- a rolling update to a new version with maxSurge 1 and maxUnavailable 0: the
  surge pod takes the free node's GPU, every replica stays Ready throughout, the
  new ones verified, and the old ones' mounts go;
- a fourth node joins with the startup taint while a replica waits for a GPU: its
  agent warms the Bento, says how long after Ready (Event and metric) and removes
  the taint, and only then the replica lands there.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from common.warm import NODE_EVENTS_NAMESPACE, STARTUP_TAINT, warm_label_key
from devcluster import Cluster, ControlPlane, wait_for
from devcluster.installs.injector_install import NAMESPACE as AGENT_NAMESPACE
from devcluster.installs.node_agent import SELECTOR as AGENT_SELECTOR
from devcluster.installs.node_agent import LocalNodeAgent
from devcluster.node.node import Node
from devcluster.storage.stack import MIB, StorageStack
from modelstore.manifest import Manifest
from tests.e2e.pods import (
    GATE,
    bento_labels,
    checking_deployment,
    checking_pod,
    condition,
    create_pod,
    diagnose,
    is_ready,
    opted_in_namespace,
    wait_pod,
)

BENTO, VERSION = "pool-bento", "v1"
DEPLOYMENT = "pool-bento"
SHARDS = [32 * MIB] * 4
WARM_LABEL = warm_label_key(BENTO, VERSION)
NEW_VERSION = "v2"
NEW_WARM_LABEL = warm_label_key(BENTO, NEW_VERSION)
NODES = 3
PLACEMENTS = 10
GPU = {"nvidia.com/gpu": "1"}
SSD = "cloud.google.com/gke-ephemeral-storage-local-ssd"
AGENT_METRICS_PORT = 9464
READY_TO_WARM = "bento_juicefs_node_agent_ready_to_warm_seconds"


@pytest.fixture(scope="module")
def pool(cluster: Cluster) -> Iterator[list[str]]:
    """The names of NODES schedulable local-SSD GPU nodes; the local cluster gets the
    ones it lacks for this module, and loses them again at its end."""
    added: list[Node] = []
    if isinstance(cluster, ControlPlane) and cluster.node is not None:
        while len(cluster.nodes) < NODES:
            added.append(cluster.add_node())
    names = sorted(
        n["metadata"]["name"]
        for n in cluster.get_json("nodes", "-l", f"{SSD}=true")["items"]
        if not n["spec"].get("unschedulable")
    )
    if len(names) < NODES:
        pytest.skip(f"needs {NODES} schedulable local-SSD GPU nodes; the cluster has {names}")
    try:
        yield names
    finally:
        if isinstance(cluster, ControlPlane):
            for node in reversed(added):
                cluster.remove_node(node)


@pytest.fixture(scope="module")
def model(storage: StorageStack, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return storage.publish_random(tmp_path_factory.mktemp("pool"), BENTO, VERSION, SHARDS)


@pytest.fixture(scope="module")
def new_model(storage: StorageStack, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return storage.publish_random(tmp_path_factory.mktemp("pool"), BENTO, NEW_VERSION, SHARDS)


@pytest.fixture(scope="module")
def namespace(cluster: Cluster, pool: list[str], model: Manifest) -> Iterator[str]:
    with opted_in_namespace(cluster, "pool") as name:
        yield name


def gpu_pod(name: str, model: Manifest) -> dict[str, Any]:
    """A Bento pod that asks for the node's GPU and checks the model's largest file."""
    shard = max(model.files, key=lambda f: f.size)
    pod = checking_pod(name, bento_labels(BENTO, VERSION), shard.path, shard.sha256)
    pod["spec"]["containers"][0]["resources"] = {"limits": GPU}
    # The app is `sleep`, which ignores SIGTERM as pid 1: a placement is gone at once.
    pod["spec"]["terminationGracePeriodSeconds"] = 1
    return pod


def warm_nodes(cluster: Cluster, label: str = WARM_LABEL) -> set[str]:
    nodes = cluster.get_json("nodes", "-l", label)["items"]
    return {n["metadata"]["name"] for n in nodes}


def pods_of(cluster: Cluster, namespace: str, app: str = DEPLOYMENT) -> list[dict[str, Any]]:
    items = cluster.get_json("pods", "-n", namespace, "-l", f"app={app}")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def scale(cluster: Cluster, namespace: str, replicas: int, name: str = DEPLOYMENT) -> None:
    cluster.kubectl("scale", "deployment", name, "-n", namespace, f"--replicas={replicas}")


def delete_pod(cluster: Cluster, namespace: str, name: str) -> None:
    cluster.kubectl("delete", "pod", name, "-n", namespace, "--wait=true", "--timeout=60s")


def scheduled_node(cluster: Cluster, namespace: str, name: str) -> str:
    pod = wait_pod(
        cluster,
        namespace,
        name,
        lambda p: bool(p["spec"].get("nodeName")),
        timeout=60,
        what=f"pod {name} scheduled",
    )
    return str(pod["spec"]["nodeName"])


@pytest.fixture(scope="module")
def warm_node(cluster: Cluster, namespace: str, model: Manifest) -> str:
    """The node a first replica ran on, once its agent labelled it warm."""
    assert not warm_nodes(cluster), "the Bento is warm somewhere before any pod ran"
    create_pod(cluster, namespace, gpu_pod("first", model))
    pod = wait_pod(cluster, namespace, "first", is_ready, timeout=180, what="pod first Ready")
    node = str(pod["spec"]["nodeName"])
    wait_for(lambda: warm_nodes(cluster) == {node}, timeout=60, what=f"{WARM_LABEL} on {node}")
    delete_pod(cluster, namespace, "first")
    return node


def test_new_replicas_land_on_the_node_where_the_bento_is_warm(
    cluster: Cluster, namespace: str, model: Manifest, warm_node: str, pool: list[str]
) -> None:
    landed: list[str] = []
    for index in range(PLACEMENTS):
        name = f"placement-{index}"
        create_pod(cluster, namespace, gpu_pod(name, model))
        landed.append(scheduled_node(cluster, namespace, name))
        delete_pod(cluster, namespace, name)
    on_warm = landed.count(warm_node) / len(landed)
    print(f"warm placement: {landed.count(warm_node)}/{len(landed)} on {warm_node} of {pool}")
    assert on_warm >= 0.95, f"placements {landed}; warm: {warm_node}"


def set_gpus(cluster: Cluster, node: str, count: int) -> None:
    """The node's GPU count, on its status as a device plugin would advertise it."""
    gpus = {"nvidia.com/gpu": str(count)}
    status = {"status": {"capacity": gpus, "allocatable": gpus}}
    cluster.kubectl(
        "patch", "node", node, "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )  # fmt: skip


def test_a_new_replica_joins_a_running_one_on_the_warm_node_while_it_has_room(
    cluster: Cluster, namespace: str, model: Manifest, warm_node: str, pool: list[str]
) -> None:
    """The scheduler spreads a Deployment's replicas by default (PodTopologySpread's
    system defaults), which counts against the node already running one. With room
    for two on the warm node, the second replica still goes there: the warm term's
    share of NodeAffinity's score outweighs the spreading."""
    name = "beside"
    set_gpus(cluster, warm_node, 2)
    landed: list[str] = []
    try:
        apply_deployment(cluster, namespace, VERSION, model, replicas=1, name=name)
        (first,) = wait_for(
            lambda: [p for p in pods_of(cluster, namespace, name) if is_ready(p)] or None,
            timeout=120,
            what=f"the first replica of {name} Ready",
        )
        assert first["spec"]["nodeName"] == warm_node
        for _ in range(PLACEMENTS):
            scale(cluster, namespace, 2, name)
            new = wait_for(
                lambda: (
                    [
                        p
                        for p in pods_of(cluster, namespace, name)
                        if p["metadata"]["name"] != first["metadata"]["name"]
                        and p["spec"].get("nodeName")
                    ]
                    or None
                ),
                timeout=60,
                what="the second replica scheduled",
            )
            landed.append(new[0]["spec"]["nodeName"])
            # The ReplicaSet removes the replica that is not Ready yet: the new one.
            # Until it is gone it holds its GPU, so the next placement waits for that.
            scale(cluster, namespace, 1, name)
            wait_for(
                lambda: (
                    [
                        p["metadata"]["name"]
                        for p in cluster.get_json("pods", "-n", namespace, "-l", f"app={name}")[
                            "items"
                        ]
                    ]
                    == [first["metadata"]["name"]]
                ),
                timeout=60,
                what="only the first replica left",
            )
    finally:
        cluster.kubectl("delete", "deployment", name, "-n", namespace, "--wait=true")
        wait_for(lambda: not pods_of(cluster, namespace, name), timeout=60, what="no pods left")
        set_gpus(cluster, warm_node, 1)
    print(f"beside a replica: {landed.count(warm_node)}/{len(landed)} on {warm_node} of {pool}")
    assert landed.count(warm_node) / len(landed) >= 0.95, f"placements {landed}; warm: {warm_node}"


def test_a_scale_up_from_0_to_3_runs_a_verified_replica_on_every_node(
    cluster: Cluster, namespace: str, model: Manifest, warm_node: str, pool: list[str]
) -> None:
    apply_deployment(cluster, namespace, VERSION, model, replicas=0)
    started = time.monotonic()
    scale(cluster, namespace, NODES)

    def all_ready() -> list[dict[str, Any]] | None:
        pods = pods_of(cluster, namespace)
        return pods if len(pods) == NODES and all(is_ready(p) for p in pods) else None

    try:
        pods = wait_for(all_ready, timeout=240, what=f"{NODES} replicas Ready")
    except Exception:
        for pod in pods_of(cluster, namespace):
            print(diagnose(cluster, namespace, pod["metadata"]["name"]))
        raise
    print(f"0 -> {NODES} replicas Ready in {time.monotonic() - started:.1f}s")
    used = {p["spec"]["nodeName"] for p in pods}
    assert len(used) == NODES, "one replica a node: each takes its node's GPU"
    for pod in pods:
        gate = condition(pod, GATE)
        assert gate is not None, pod["metadata"]["name"]
        assert gate["status"] == "True", pod["metadata"]["name"]
        # The app checked the model's sha256 before it slept: it runs, not restarted.
        (status,) = pod["status"]["containerStatuses"]
        assert status["restartCount"] == 0
        assert "running" in status["state"]
    wait_for(lambda: used <= warm_nodes(cluster), timeout=60, what="every node warm")


def apply_deployment(
    cluster: Cluster,
    namespace: str,
    version: str,
    model: Manifest,
    replicas: int,
    name: str = DEPLOYMENT,
) -> None:
    """The pool's Bento Deployment at version: GPU pods that check the model's sha256,
    rolled one surge pod at a time with none unavailable."""
    strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    deployment = checking_deployment(
        name, bento_labels(BENTO, version), model, replicas=replicas, strategy=strategy
    )
    template = deployment["spec"]["template"]["spec"]
    template["containers"][0]["resources"] = {"limits": GPU}
    template["terminationGracePeriodSeconds"] = 1
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment), check=True)


def juicefs_mounts_for(node: Node, pod_uid: str) -> list[str]:
    return [str(m) for m in node.mounts("fuse.juicefs") if pod_uid in str(m)]


def test_a_drained_node_s_replica_starts_verified_on_another_and_leaves_no_mount(
    cluster: Cluster, namespace: str, model: Manifest, pool: list[str]
) -> None:
    scale(cluster, namespace, NODES - 1)
    wait_for(
        lambda: len(pods_of(cluster, namespace)) == NODES - 1 or None,
        timeout=60,
        what=f"{NODES - 1} replicas",
    )
    pods = pods_of(cluster, namespace)
    # Not the first node: the injector's replicas run there since the cluster started.
    victim = next(p for p in pods if p["spec"]["nodeName"] != pool[0])
    drained = str(victim["spec"]["nodeName"])
    busy = {p["spec"]["nodeName"] for p in pods}
    cluster.kubectl(
        "drain", drained, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=90s"
    )
    try:

        def moved() -> dict[str, Any] | None:
            """The replacement, Ready on a node that had no replica (its GPU was free)."""
            pods = pods_of(cluster, namespace)
            found = [p for p in pods if p["spec"].get("nodeName") not in (None, *busy)]
            return found[0] if found and is_ready(found[0]) else None

        replacement = wait_for(moved, timeout=180, what="a Ready replica on a free node")
        gate = condition(replacement, GATE)
        assert gate is not None
        assert gate["status"] == "True"
        if isinstance(cluster, ControlPlane):
            node = next(n for n in cluster.nodes if n.name == drained)
            uid = str(victim["metadata"]["uid"])
            assert not juicefs_mounts_for(node, uid), f"{drained} kept a mount for {uid}"
    finally:
        cluster.kubectl("uncordon", drained)


def test_a_rolling_update_across_nodes_keeps_every_replica_serving_verified_bytes(
    cluster: Cluster, namespace: str, new_model: Manifest, pool: list[str]
) -> None:
    replicas = NODES - 1
    old = {p["metadata"]["uid"]: p["spec"]["nodeName"] for p in pods_of(cluster, namespace)}
    assert len(old) == replicas
    apply_deployment(cluster, namespace, NEW_VERSION, new_model, replicas=replicas)
    started = time.monotonic()
    fewest_ready = replicas

    def rolled() -> list[dict[str, Any]] | None:
        nonlocal fewest_ready
        pods = pods_of(cluster, namespace)
        fewest_ready = min(fewest_ready, sum(1 for p in pods if is_ready(p)))
        new = [p for p in pods if p["metadata"]["labels"]["yatai.ai/bento-version"] == NEW_VERSION]
        done = len(pods) == replicas and len(new) == replicas and all(is_ready(p) for p in new)
        return new if done else None

    pods = wait_for(rolled, timeout=300, interval=0.5, what=f"{replicas} {NEW_VERSION} replicas")
    print(f"rolled {replicas} replicas to {NEW_VERSION} in {time.monotonic() - started:.1f}s")
    # maxUnavailable 0: some replica was Ready throughout (a pod is Ready only with
    # the gate open, after its model is proven).
    assert fewest_ready >= replicas
    for pod in pods:
        gate = condition(pod, GATE)
        assert gate is not None
        assert gate["status"] == "True"
        assert pod["metadata"]["uid"] not in old
    wait_for(
        lambda: len(warm_nodes(cluster, NEW_WARM_LABEL)) >= replicas,
        timeout=60,
        what=f"{NEW_WARM_LABEL} on the new pods' nodes",
    )
    if isinstance(cluster, ControlPlane):
        nodes = {n.name: n for n in cluster.nodes}

        def unmounted() -> bool:
            return all(not juicefs_mounts_for(nodes[name], uid) for uid, name in old.items())

        wait_for(unmounted, timeout=60, what="the old replicas' mounts to go")


def node_events(cluster: Cluster, node: str, reason: str) -> list[dict[str, Any]]:
    selector = f"involvedObject.kind=Node,involvedObject.name={node},reason={reason}"
    items: list[dict[str, Any]] = cluster.get_json(
        "events", "-n", NODE_EVENTS_NAMESPACE, "--field-selector", selector
    )["items"]
    return items


def agent_pod(cluster: Cluster, node: str) -> dict[str, Any] | None:
    pods = cluster.get_json(
        "pods", "-n", AGENT_NAMESPACE, "-l", AGENT_SELECTOR, "--field-selector",
        f"spec.nodeName={node}",
    )["items"]  # fmt: skip
    return pods[0] if pods else None


def agent_logs(cluster: Cluster, node: str) -> str:
    pod = agent_pod(cluster, node)
    if pod is None:
        return f"no agent pod on {node}"
    name = pod["metadata"]["name"]
    logs = cluster.kubectl("logs", "-n", AGENT_NAMESPACE, name, "--tail=60", check=False)
    return f"agent {name} on {node} ({pod['status'].get('phase')}):\n{logs.stdout}{logs.stderr}"


def agent_metric(cluster: Cluster, node: str, name: str) -> float | None:
    """A metric of the agent pod on node, read from its pod IP (the host routes every node's
    pods), or None while it is not there."""
    pod = agent_pod(cluster, node)
    ip = None if pod is None else pod["status"].get("podIP")
    if ip is None:
        return None
    try:
        with urllib.request.urlopen(f"http://{ip}:{AGENT_METRICS_PORT}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def test_a_node_that_joins_with_the_startup_taint_is_warmed_then_opened_to_the_pods(
    cluster: Cluster, namespace: str, node_agent: LocalNodeAgent, pool: list[str]
) -> None:
    if not isinstance(cluster, ControlPlane):
        pytest.skip("joins a node to the local cluster")
    # Prewarm: the agent warms what the Deployments ask for, before their pods.
    node_agent.install(prewarm=True)
    startup = f"{STARTUP_TAINT}=true:NoSchedule"
    joined = cluster.add_node(taints=[startup])
    try:
        # Every node has a GPU left but the old free one and the new one: two replicas
        # more, one of which only the new node can take, once its agent opens it.
        scale(cluster, namespace, NODES + 1)
        try:
            warm_event = wait_for(
                lambda: next(iter(node_events(cluster, joined.name, "NodeWarm")), None),
                timeout=120,
                what=f"the NodeWarm Event of {joined.name}",
            )
        except TimeoutError:
            print(agent_logs(cluster, joined.name))
            raise
        print(f"{joined.name}: {warm_event['message']}")
        assert f"removed the startup taint {STARTUP_TAINT}" in warm_event["message"]
        node = cluster.get_json("node", joined.name)
        assert STARTUP_TAINT not in {t["key"] for t in node["spec"].get("taints") or []}
        assert node["metadata"]["labels"].get(NEW_WARM_LABEL) == "models"
        seconds = float(warm_event["message"].split("s after the node turned Ready")[0].split()[-1])
        metric = wait_for(
            lambda: agent_metric(cluster, joined.name, READY_TO_WARM),
            timeout=30,
            what=f"{READY_TO_WARM} of {joined.name}",
        )
        assert metric == pytest.approx(seconds, abs=0.1)

        def on_joined() -> dict[str, Any] | None:
            found = [
                p for p in pods_of(cluster, namespace) if p["spec"].get("nodeName") == joined.name
            ]
            return found[0] if found and is_ready(found[0]) else None

        pod = wait_for(on_joined, timeout=180, what=f"a Ready replica on {joined.name}")
        gate = condition(pod, GATE)
        assert gate is not None
        assert gate["status"] == "True"
        # It was let onto the node only once the node was warm.
        scheduled = condition(pod, "PodScheduled")
        assert scheduled is not None
        assert scheduled["lastTransitionTime"] >= warm_event["metadata"]["creationTimestamp"]
    finally:
        scale(cluster, namespace, NODES - 1)
        cluster.remove_node(joined)
        node_agent.restore()
