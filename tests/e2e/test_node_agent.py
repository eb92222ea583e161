"""The node agent as a DaemonSet pod on the real node: warm before the pods arrive.

A Bento Deployment is created with 0 replicas in an opted-in namespace. The
agent (the shipped DaemonSet, devcluster.installs.node_agent) sees it, streams its
model into the node cache, verifies it against the manifest, and records it
on the Node: a warm label the injector's preferred affinity names, the
warm-models annotation, and Events that `kubectl describe node` lists. Then
the Deployment scales to 1: the pod turns Ready with the model's bytes from
the node cache, and MinIO serves (almost) nothing in between.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from common.warm import WARM_ANNOTATION, NodeWarmth, warm_label_key
from devcluster import Cluster, wait_for
from devcluster.installs.node_agent import LocalNodeAgent
from devcluster.node.host import copied_bytes, local_copies_dir, node_cache_dir
from devcluster.node.node import Node
from devcluster.storage.minio_metrics import store_requests
from devcluster.storage.stack import MIB, StorageStack
from modelstore.manifest import Manifest
from tests.e2e.pods import (
    GATE,
    bento_deployment,
    bento_labels,
    check_command,
    checking_deployment,
    condition,
    diagnose,
    is_ready,
    opted_in_namespace,
    wait_event,
)

BENTO, VERSION = "agent-warmed-bento", "v1"
DEPLOYMENT = "agent-warmed-bento"
SHARDS = [64 * MIB] * 4
LABEL = warm_label_key(BENTO, VERSION)
NEW_VERSION = "v2"
NEW_LABEL = warm_label_key(BENTO, NEW_VERSION)
NEW_SHARDS = [256 * MIB] * 4
EVICT_AFTER = 10


@pytest.fixture(scope="module")
def model(storage: StorageStack, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return storage.publish_random(tmp_path_factory.mktemp("agent"), BENTO, VERSION, SHARDS)


@pytest.fixture(scope="module")
def agent(node_agent: LocalNodeAgent) -> Iterator[LocalNodeAgent]:
    # Prewarm on, and a short grace, so that a version no workload uses is
    # evicted within the test; the cluster's default agent afterwards.
    pod = node_agent.install(prewarm=True, evict_after_seconds=EVICT_AFTER)
    print(f"node agent pod {pod} runs")
    yield node_agent
    print(node_agent.logs()[-4000:])
    node_agent.restore()


@pytest.fixture(scope="module")
def namespace(cluster: Cluster, node: Node) -> Iterator[str]:
    with opted_in_namespace(cluster, "e2e-agent") as name:
        yield name


def deployment(model: Manifest, replicas: int, version: str = VERSION) -> dict[str, Any]:
    return checking_deployment(DEPLOYMENT, bento_labels(BENTO, version), model, replicas)


def node_labels(cluster: Cluster, node: Node) -> dict[str, str]:
    labels: dict[str, str] = cluster.get_json("node", node.name)["metadata"].get("labels") or {}
    return labels


def node_events(cluster: Cluster, node_name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json(
        "events", "-n", "default", "--field-selector", f"involvedObject.name={node_name}"
    )["items"]
    return sorted(items, key=lambda e: e["metadata"]["name"])


def test_a_deployment_with_no_replicas_is_warmed_and_its_first_pod_starts_from_the_node_cache(
    cluster: Cluster,
    node: Node,
    storage: StorageStack,
    agent: LocalNodeAgent,
    namespace: str,
    model: Manifest,
) -> None:
    since = time.monotonic()
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment(model, 0)))

    try:
        volume = wait_for(
            lambda: node_labels(cluster, node).get(LABEL),
            timeout=180,
            interval=0.5,
            what=f"node label {LABEL}",
        )
    except TimeoutError:
        raise AssertionError(f"the agent did not warm {BENTO}:\n{agent.logs()}") from None
    warmed_in = time.monotonic() - since
    assert volume == "models"
    annotations = cluster.get_json("node", node.name)["metadata"]["annotations"]
    warmth = NodeWarmth.parse(annotations[WARM_ANNOTATION])
    record = next(r for ref, r in warmth.records.items() if ref.name == BENTO)
    # What the Bento takes of the node's disk: its local copy, the node's one copy of it.
    assert (record.state, record.verified, record.bytes) == ("warm", True, model.total_bytes)
    reasons = [e["reason"] for e in node_events(cluster, node.name)]
    assert "ModelWarming" in reasons
    assert "ModelWarm" in reasons
    described = cluster.kubectl("describe", "node", node.name).stdout
    assert WARM_ANNOTATION in described
    assert "ModelWarm" in described

    # Scale up: the pod prefers the warm node and reads its model from the node cache.
    before = store_requests(storage.store)
    since = time.monotonic()
    cluster.kubectl("scale", "deployment", DEPLOYMENT, "-n", namespace, "--replicas=1")

    def ready_pod() -> dict[str, Any] | None:
        pods = cluster.get_json("pods", "-n", namespace, "-l", f"app={DEPLOYMENT}")["items"]
        return next((p for p in pods if is_ready(p)), None)

    try:
        pod = wait_for(ready_pod, timeout=180, interval=0.3, what="the scaled-up pod Ready")
    except TimeoutError:
        pods = cluster.get_json("pods", "-n", namespace)["items"]
        details = "\n".join(diagnose(cluster, namespace, p["metadata"]["name"]) for p in pods)
        raise AssertionError(f"no Ready pod after scaling to 1:\n{details}") from None
    ready_in = time.monotonic() - since
    served = store_requests(storage.store) - before
    name = pod["metadata"]["name"]
    ready_event = wait_event(cluster, namespace, name, "ModelsReady", timeout=30)
    print(
        f"\nagent warmed {model.total_bytes / MIB:.0f} MiB {warmed_in:.1f}s after the "
        f"0-replica Deployment was applied; the scaled-up pod was Ready {ready_in:.1f}s after "
        f"`kubectl scale`, MinIO serving {served.bytes_sent / MIB:.2f} MiB in {served.gets} GETs "
        f"meanwhile\n  ModelsReady: {ready_event['message']}"
    )
    # The agent prewarmed and verified it: the pod's gate opens from its seal.
    assert "sealed by the node agent" in ready_event["message"]
    assert served.bytes_sent < 0.01 * model.total_bytes
    gate = condition(pod, GATE)
    assert gate is not None
    assert (gate["status"], gate["reason"]) == ("True", "ModelsSealed")
    preferred = pod["spec"]["affinity"]["nodeAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert {"key": LABEL, "operator": "In", "values": ["models"]} in [
        e for term in preferred for e in term["preference"]["matchExpressions"]
    ]


def warmth_of(cluster: Cluster, node: Node) -> dict[str, str]:
    """version -> state of the test Bento in the Node's warm-models record."""
    annotations = cluster.get_json("node", node.name)["metadata"].get("annotations") or {}
    records = NodeWarmth.parse(annotations.get(WARM_ANNOTATION)).records
    return {ref.version: r.state for ref, r in records.items() if ref.name == BENTO}


def test_a_new_version_is_warmed_across_an_agent_restart_and_the_old_one_evicted(
    cluster: Cluster,
    node: Node,
    storage: StorageStack,
    agent: LocalNodeAgent,
    namespace: str,
    model: Manifest,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    assert warmth_of(cluster, node).get(VERSION) == "warm", "runs after the scale-up test"
    new = storage.publish_random(
        tmp_path_factory.mktemp("agent-v2"), BENTO, NEW_VERSION, NEW_SHARDS
    )
    copies = local_copies_dir(node_cache_dir(node.dir), "models")

    def held() -> int:
        """What the agent's copies hold: files kept, and what is written of those in flight."""
        return copied_bytes(copies, staged=True)

    held_before = held()
    # No replicas while the version changes: every byte MinIO serves is the agent's.
    cluster.kubectl("scale", "deployment", DEPLOYMENT, "-n", namespace, "--replicas=0")
    before = store_requests(storage.store)
    first_agent = agent.running_pod()
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-",
        input=json.dumps(deployment(new, 0, NEW_VERSION)),
    )  # fmt: skip

    def partly_warm() -> int | None:
        grown = held() - held_before
        return grown if grown >= 0.3 * new.total_bytes else None

    grown = wait_for(partly_warm, timeout=180, interval=0.1, what="v2 partly on the node")
    assert warmth_of(cluster, node).get(NEW_VERSION) == "warming"
    # The DaemonSet's pod deleted mid-warm, as a node drain or an upgrade would.
    # Once it is gone: what its copy holds, and what MinIO has sent so far.
    cluster.kubectl(
        "delete", "pod", str(first_agent), "-n", "bento-juicefs-system", "--timeout=60s",
        timeout=90,
    )  # fmt: skip
    at_restart = held() - held_before
    restart = store_requests(storage.store)

    try:
        wait_for(
            lambda: node_labels(cluster, node).get(NEW_LABEL),
            timeout=240,
            interval=0.5,
            what=f"node label {NEW_LABEL}",
        )
    except TimeoutError:
        raise AssertionError(f"v2 never became warm:\n{agent.logs()}") from None
    second_agent = agent.running_pod()
    assert second_agent != first_agent
    done = store_requests(storage.store)
    first, second = restart - before, done - restart
    missing = new.total_bytes - at_restart
    print(
        f"\nv2 ({new.total_bytes / MIB:.0f} MiB): agent {first_agent} deleted at "
        f"{grown / MIB:.0f} MiB on the node; it had fetched {first.bytes_sent / MIB:.0f} "
        f"MiB, {at_restart / MIB:.0f} MiB of it reached its copy (the rest was in flight). "
        f"{second_agent} then fetched {second.bytes_sent / MIB:.0f} MiB for the "
        f"{missing / MIB:.0f} MiB missing; in all {(done - before).bytes_sent / MIB:.0f} MiB "
        f"({(done - before).bytes_sent / new.total_bytes:.2f}x the model)"
    )
    # The new agent fetches what the copy lacks, not the model again: each file
    # resumes from the whole ranges (4 MiB blocks) written of it.
    assert second.bytes_sent <= missing * 1.05 + len(new.files) * 4 * MIB
    assert at_restart > 0.25 * new.total_bytes

    # v1: no workload uses it any more; after the grace the agent evicts it.
    def v1_evicted() -> bool:
        return warmth_of(cluster, node).get(VERSION) == "evicted"

    wait_for(v1_evicted, timeout=EVICT_AFTER + 60, interval=0.5, what="v1 evicted")
    labels = node_labels(cluster, node)
    assert LABEL not in labels
    assert labels.get(NEW_LABEL) == "models"
    assert warmth_of(cluster, node) == {VERSION: "evicted", NEW_VERSION: "warm"}
    assert held() < held_before - 0.9 * model.total_bytes + new.total_bytes + 8 * MIB
    reasons = [e["reason"] for e in node_events(cluster, node.name)]
    assert "ModelEvicted" in reasons


def test_with_an_hour_between_resyncs_a_new_deployment_is_warmed_at_once(
    cluster: Cluster,
    node: Node,
    storage: StorageStack,
    agent: LocalNodeAgent,
    namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The agent watches Deployments and StatefulSets: a new one wakes its loop at once;
    the resync is only the fallback. Runs last: it reinstalls the agent."""
    pod = agent.install(prewarm=True, resync_seconds=3600, evict_after_seconds=3600)

    def first_pass_done() -> bool:
        out = cluster.kubectl("logs", "-n", "bento-juicefs-system", pod, check=False).stdout
        return '"agent.pass_done"' in out

    wait_for(first_pass_done, timeout=120, interval=0.5, what=f"{pod}'s first pass")
    name = "agent-watched-bento"
    watched = storage.publish_random(
        tmp_path_factory.mktemp("agent-watched"), name, VERSION, [16 * MIB] * 2
    )
    label = warm_label_key(name, VERSION)
    shard = watched.files[0]
    since = time.monotonic()
    manifest = bento_deployment(
        name, bento_labels(name, VERSION), check_command(shard.path, shard.sha256), 0
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    try:
        wait_for(
            lambda: node_labels(cluster, node).get(label),
            timeout=120,
            interval=0.3,
            what=f"node label {label}",
        )
    except TimeoutError:
        raise AssertionError(f"the agent did not react to {name}:\n{agent.logs()}") from None
    print(
        f"\nwith a 3600 s resync, {name} ({watched.total_bytes / MIB:.0f} MiB) was warm "
        f"{time.monotonic() - since:.1f}s after kubectl apply"
    )
