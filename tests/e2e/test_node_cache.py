"""The node cache on the real node: a second replica and a rolled-out pod start warm.

A Bento Deployment (the sample Bento image; its command proves a published
shard's sha256 through the model mount, then sleeps) in an opted-in
namespace, with the injector's defaults: the node cache, whose directory on
the local node is `<node dir>/local-ssd/models` (devcluster's cache.nodePath).
The node agent is its only writer: the first pod's seal makes it warm and
verify the Bento once, on demand. Scaled from 1 to 2 replicas on the one
node, then rolled to new pods: every pod after the first opens its gate
from that seal, and the object store serves (almost) nothing more, by
MinIO's own count. Each pod's time from creation to Ready is printed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest

from devcluster import Cluster, wait_for
from devcluster.images import SAMPLE_BENTO_IMAGE
from devcluster.installs.injector_install import InjectorInstall
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
    checking_deployment,
    condition,
    diagnose,
    events,
    exec_in,
    get_pod,
    is_ready,
    opted_in_namespace,
    wait_event,
    wait_log,
)

BENTO, VERSION = "node-cache-bento", "v1"
DEPLOYMENT = "node-cache-bento"
SHARDS = [64 * MIB] * 4
ROLLOUT = "e2e.bento-juicefs/rollout"


@pytest.fixture(scope="module")
def model(storage: StorageStack, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return storage.publish_random(tmp_path_factory.mktemp("node-cache"), BENTO, VERSION, SHARDS)


@pytest.fixture(scope="module")
def namespace(cluster: Cluster, node: Node) -> Iterator[str]:
    with opted_in_namespace(cluster, "e2e-cache") as name:
        yield name


def deployment(model: Manifest, replicas: int, rollout: str) -> dict[str, Any]:
    return checking_deployment(
        DEPLOYMENT,
        bento_labels(BENTO, VERSION),
        model,
        replicas,
        annotations={ROLLOUT: rollout},
        # A new pod starts before an old one goes, as in most rollouts.
        strategy={"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
    )


def live_pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json(
        "pods", "-n", namespace, "-l", f"app={DEPLOYMENT}"
    )["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


@dataclass
class Started:
    """A pod of the Deployment once Ready, and what opened its gate."""

    name: str
    pod: dict[str, Any]
    models_ready: str
    observed_seconds: float  # from the kubectl command that made it to Ready, polled

    @property
    def api_seconds(self) -> float:
        """creationTimestamp to the Ready condition's lastTransitionTime (whole seconds)."""
        ready = condition(self.pod, "Ready")
        assert ready is not None
        created = _time(self.pod["metadata"]["creationTimestamp"])
        return (_time(ready["lastTransitionTime"]) - created).total_seconds()

    def line(self, what: str) -> str:
        return (
            f"{what:<14} {self.name}: Ready {self.observed_seconds:5.1f}s after the command "
            f"({self.api_seconds:.0f}s creation->Ready by the API)"
        )


def wait_new_ready(
    cluster: Cluster, namespace: str, known: set[str], count: int, since: float
) -> list[Started]:
    """The next `count` pods not in known, each once Ready (Ready times polled every 0.3 s)."""
    ready_at: dict[str, float] = {}
    deadline = time.monotonic() + 240
    while True:
        for pod in live_pods(cluster, namespace):
            name = pod["metadata"]["name"]
            if name not in known and name not in ready_at and is_ready(pod):
                ready_at[name] = time.monotonic()
        if len(ready_at) >= count:
            break
        if time.monotonic() > deadline:
            names = [p["metadata"]["name"] for p in live_pods(cluster, namespace)]
            details = "\n".join(diagnose(cluster, namespace, n) for n in names if n not in known)
            raise AssertionError(f"{count} new pods not Ready within 240s:\n{details}")
        time.sleep(0.3)
    started = []
    for name, at in sorted(ready_at.items(), key=lambda item: item[1]):
        pod = get_pod(cluster, namespace, name)
        event = wait_event(cluster, namespace, name, "ModelsReady", timeout=30)
        started.append(Started(name, pod, str(event["message"]), at - since))
    return started


def test_a_second_replica_and_a_rollout_start_from_the_node_cache(
    cluster: Cluster, node: Node, storage: StorageStack, namespace: str, model: Manifest
) -> None:
    total = model.total_bytes
    before = store_requests(storage.store)
    since = time.monotonic()
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(deployment(model, 1, "1"))
    )
    (first,) = wait_new_ready(cluster, namespace, set(), 1, since)
    known = {first.name}
    cold = store_requests(storage.store) - before

    before = store_requests(storage.store)
    since = time.monotonic()
    cluster.kubectl("scale", "deployment", DEPLOYMENT, "-n", namespace, "--replicas=2")
    (second,) = wait_new_ready(cluster, namespace, known, 1, since)
    known.add(second.name)

    since = time.monotonic()
    patch = {"spec": {"template": {"metadata": {"annotations": {ROLLOUT: "2"}}}}}
    cluster.kubectl(
        "patch", "deployment", DEPLOYMENT, "-n", namespace, "--type=merge", "-p", json.dumps(patch)
    )
    rolled = wait_new_ready(cluster, namespace, known, 2, since)
    cluster.kubectl(
        "rollout", "status", f"deployment/{DEPLOYMENT}", "-n", namespace, "--timeout=120s",
        timeout=150,
    )  # fmt: skip
    warm = store_requests(storage.store) - before

    print(f"\nnode cache on the real node, model {total / MIB:.0f} MiB:")
    print(f"  the store sent {cold.bytes_sent / MIB:.0f} MiB for the first pod, then "
          f"{warm.bytes_sent / MIB:.1f} MiB for the three after it")  # fmt: skip
    print(first.line("first pod"))
    print(second.line("second replica"))
    for index, pod in enumerate(rolled, 1):
        print(pod.line(f"rollout pod {index}"))
    for pod in (first, second, *rolled):
        print(f"  {pod.name} ModelsReady: {pod.models_ready}")

    assert cold.bytes_sent >= total, "the agent fetched the model once, for the first pod"
    assert warm.bytes_sent <= total * 0.05, "the next pods read only what the node holds"
    for pod in (first, second, *rolled):
        gate = condition(pod.pod, GATE)
        assert gate is not None
        assert (gate["status"], gate["reason"]) == ("True", "ModelsSealed")
        assert "sealed by the node agent" in pod.models_ready
    # Every pod ran the app's own check of the shard's sha256 through the mount.
    for pod in (first, second, *rolled):
        wait_log(cluster, namespace, pod.name, "main", "verified")


def test_the_node_cache_is_the_nodes_and_only_the_sidecar_sees_it(
    cluster: Cluster, node: Node, namespace: str, model: Manifest
) -> None:
    pods = live_pods(cluster, namespace)
    assert pods, "runs after the Deployment test"
    directory = node_cache_dir(node.dir) / "models"
    volume = next(v for v in pods[0]["spec"]["volumes"] if v["name"] == "juicefs-cache")
    # No hostPath in a tenant pod: the agent binds the node cache onto this emptyDir.
    assert "emptyDir" in volume, volume
    # The model is on the node, under the node's own directory: the agent's verified
    # copy, the node's one copy of a Bento whose pods read every model.
    assert copied_bytes(local_copies_dir(node_cache_dir(node.dir), "models")) >= model.total_bytes
    mount_ready = next(e for e in events(cluster, namespace, pods[0]["metadata"]["name"])
                       if e["reason"] == "MountReady")  # fmt: skip
    # Served from that copy: the pod mounts no JuiceFS and is lent no node cache.
    assert "no JuiceFS client runs in this pod" in mount_ready["message"], mount_ready
    for pod in pods:
        name = pod["metadata"]["name"]
        code, out = exec_in(cluster, namespace, name, "main", "cat", "/proc/self/mountinfo")
        assert code == 0, out
        assert str(directory) not in out
        assert "/var/lib/juicefs/cache" not in out
        models = [line for line in out.splitlines() if f" {MODELS_PATH} " in line]
        assert models, out
        assert "ro" in models[-1].split()[5].split(","), models
        code, out = exec_in(cluster, namespace, name, SIDECAR, "cat", "/proc/self/mountinfo")
        assert code == 0, out
        # The container's bind of its own emptyDir, and nothing of the node's over it.
        stack = [line for line in out.splitlines() if " /var/lib/juicefs/cache " in line]
        assert len(stack) == 1, stack


def own_sidecar_pod(name: str, cache: dict[str, Any], app_mounts_cache: bool) -> dict[str, Any]:
    """A pod that brings its own juicefs-mount, cache and agent volumes, as if the injector
    had run."""
    cache_mount = {"name": "juicefs-cache", "mountPath": "/cache"}
    agent_mount = {"name": "juicefs-agent", "mountPath": "/run/bento-juicefs/agent"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": bento_labels(BENTO, VERSION)},
        "spec": {
            "initContainers": [
                {
                    "name": SIDECAR,
                    "image": SAMPLE_BENTO_IMAGE,
                    "restartPolicy": "Always",
                    "command": ["sleep", "3600"],
                    "volumeMounts": [cache_mount, agent_mount],
                }
            ],
            "containers": [
                {
                    "name": "main",
                    "image": SAMPLE_BENTO_IMAGE,
                    "command": ["sleep", "3600"],
                    "volumeMounts": [cache_mount] if app_mounts_cache else [],
                }
            ],
            "readinessGates": [{"conditionType": GATE}],
            "volumes": [
                {"name": "juicefs-cache", **cache},
                {"name": "juicefs-agent", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
            ],
        },
    }


def test_with_the_injector_down_the_policy_refuses_a_cache_volume_it_would_not_write(
    cluster: Cluster, node: Node, namespace: str, injector: InjectorInstall
) -> None:
    """failurePolicy: Ignore lets pods through unmutated; the policy still holds the line:
    no host path under our volume names (not even the node cache's, which only the node
    agent binds, read-only), and no container but the sidecar mounts the cache."""
    node_cache = {"hostPath": {"path": str(node_cache_dir(node.dir) / "models")}}
    empty: dict[str, Any] = {"emptyDir": {}}
    only_empty_dirs = (
        "volumes juicefs-mount-dir, juicefs-cache and juicefs-agent are the injector's"
    )
    cases = {
        "host-etc": (own_sidecar_pod("host-etc", {"hostPath": {"path": "/etc"}}, False),
                     only_empty_dirs),
        "node-cache-host-path": (own_sidecar_pod("node-cache-host-path", node_cache, False),
                                 only_empty_dirs),
        "app-reads-cache": (own_sidecar_pod("app-reads-cache", empty, True),
                            "only the juicefs-mount sidecar may mount volume juicefs-cache"),
    }  # fmt: skip
    injector.stop()
    try:
        injector.wait_unreachable()
        for name, (pod, message) in cases.items():
            result = cluster.kubectl(
                "create", "-n", namespace, "-f", "-", "--dry-run=server",
                input=json.dumps(pod), check=False,
            )  # fmt: skip
            assert result.returncode != 0, f"{name} was admitted"
            assert "bento-juicefs-sidecar-required" in result.stderr, result.stderr
            assert message in " ".join(result.stderr.split()), result.stderr
            print(f"denied, {name}: {result.stderr.strip()}")
        allowed = cluster.kubectl(
            "create", "-n", namespace, "-f", "-", "--dry-run=server",
            input=json.dumps(own_sidecar_pod("sidecar-only", empty, False)), check=False,
        )  # fmt: skip
        assert allowed.returncode == 0, allowed.stderr
    finally:
        injector.start()
    wait_for(injector.ready, timeout=30, what="the injector back")
