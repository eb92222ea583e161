"""The unchanged Bento Deployment, running for real on the local node.

`examples/bento-deployment.yaml` is applied as a user would, in a namespace
opted in with the label; the webhook injects it; the kubelet runs the
`juicefs-mount` sidecar from the project's image and the app from the
sample Bento image (BentoML serving the model it loads from
/home/bentoml/bento/models). The model was published into the real JuiceFS
volume (MinIO + Redis) beforehand. The tests below are one story, in order:
start-up, what the app sees (the node's verified copy), traffic, deletion.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devcluster import Cluster, wait_for
from devcluster.node.node import Node
from modelstore.manifest import Manifest
from tests.e2e.pods import (
    GATE,
    SIDECAR,
    StartupWatch,
    condition,
    container_status,
    diagnose,
    events,
    exec_in,
    get_pod,
    http_json,
    juicefs_pids,
    wait_event,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "bento-deployment.yaml"
NAMESPACE = "bento-demo"
DEPLOYMENT = "llama3-8b-instruct"
SERVICE = "llama3-8b-instruct"
MODELS = "/home/bentoml/bento/models"
OPT_IN = {"juicefs.bentoml.com/injection": "enabled"}


@dataclass
class Running:
    """The example's pod once Ready, with what was seen on the way."""

    pod: dict[str, Any]
    watch: StartupWatch
    seconds: float

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def ip(self) -> str:
        return str(self.pod["status"]["podIP"])


def example_pod_name(cluster: Cluster) -> str | None:
    items = cluster.get_json(
        "pods", "-n", NAMESPACE, "-l", f"yatai.ai/bento-deployment={DEPLOYMENT}"
    )["items"]
    live = [p for p in items if not p["metadata"].get("deletionTimestamp")]
    return str(live[0]["metadata"]["name"]) if len(live) == 1 else None


@pytest.fixture(scope="module")
def running(cluster: Cluster, node: Node, example_model: Manifest) -> Iterator[Running]:
    """Opt the namespace in, add a Service, apply the example unchanged, watch it start."""
    cluster.create_namespace(NAMESPACE, OPT_IN)
    cluster.wait_provisioned(NAMESPACE)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SERVICE, "namespace": NAMESPACE},
        "spec": {
            "selector": {"yatai.ai/bento-deployment": DEPLOYMENT},
            "ports": [{"name": "http", "port": 3000, "targetPort": "http"}],
        },
    }
    cluster.apply(service)
    started = time.monotonic()
    cluster.kubectl("apply", "-f", str(EXAMPLE))
    # One GPU on the node: one replica (the example asks for two).
    cluster.kubectl("scale", "deployment", DEPLOYMENT, "-n", NAMESPACE, "--replicas=1")
    name = wait_for(lambda: example_pod_name(cluster), timeout=60, what="the example's pod")
    watch = StartupWatch(cluster, NAMESPACE, SERVICE)
    pod = watch.until_ready(name, timeout=300)
    seconds = time.monotonic() - started
    print(f"example pod {name} Ready {seconds:.1f}s after kubectl apply")
    yield Running(pod, watch, seconds)
    cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def test_the_sidecar_starts_first_and_the_app_after_the_mount_answers(
    cluster: Cluster, running: Running
) -> None:
    pod = get_pod(cluster, NAMESPACE, running.name)
    assert pod["spec"]["initContainers"][0]["name"] == SIDECAR
    sidecar = container_status(pod, SIDECAR)
    app = container_status(pod, "main")
    assert sidecar["started"] is True
    assert sidecar["ready"] is True
    assert sidecar["restartCount"] == 0, diagnose(cluster, NAMESPACE, running.name)
    sidecar_started = sidecar["state"]["running"]["startedAt"]
    app_started = app["state"]["running"]["startedAt"]
    assert sidecar_started <= app_started
    seen = events(cluster, NAMESPACE, running.name)
    order = [(e["reason"], (e.get("involvedObject") or {}).get("fieldPath", "")) for e in seen]
    started = [fp for reason, fp in order if reason == "Started"]
    assert started[0].endswith(f"{{{SIDECAR}}}"), order
    assert started[-1].endswith("{main}"), order
    # The kubelet starts `main` only once the startup probe passed, i.e. the mount answered.
    mount_ready = next(i for i, (r, _) in enumerate(order) if r == "MountReady")
    main_started = next(i for i, (r, fp) in enumerate(order) if r == "Started" and "main" in fp)
    assert mount_ready < main_started, order


def test_the_app_reads_the_published_bytes_through_the_mount(
    running: Running, example_model: Manifest
) -> None:
    answer = http_json(f"http://{running.ip}:3000/predict", {"text": "hello"})
    published = {f.path: f.sha256 for f in example_model.files}
    assert answer["files"] == published
    assert answer["total_bytes"] == example_model.total_bytes
    assert answer["models_dir"] == MODELS


def test_a_write_to_the_model_dir_is_refused(cluster: Cluster, running: Running) -> None:
    code, output = exec_in(
        cluster, NAMESPACE, running.name, "main", "sh", "-c", f"echo x > {MODELS}/poison"
    )
    assert code != 0
    assert "Read-only file system" in output, output


def test_traffic_waits_for_the_verified_model(cluster: Cluster, running: Running) -> None:
    samples = running.watch.samples
    assert samples, "the start-up was watched"
    for sample in samples:
        if sample.conditions.get(GATE) != "True":
            assert sample.conditions.get("Ready") != "True", sample
            assert not sample.ready_endpoint, sample
    held = [s for s in samples if s.conditions.get(GATE) != "True"]
    print(f"{len(samples)} samples, {len(held)} before the gate opened")
    pod = get_pod(cluster, NAMESPACE, running.name)
    gate = condition(pod, GATE)
    ready = condition(pod, "Ready")
    assert gate is not None
    assert gate["status"] == "True"
    # Verified by the sidecar (pod cache), or sealed by the agent (node cache, the default).
    assert gate["reason"] in ("ModelsCached", "ModelsSealed"), gate
    assert ready is not None
    assert ready["lastTransitionTime"] >= gate["lastTransitionTime"]
    assert running.watch.samples[-1].ready_endpoint


def test_describe_tells_the_story_in_order(cluster: Cluster, running: Running) -> None:
    describe = cluster.kubectl("describe", "pod", running.name, "-n", NAMESPACE).stdout
    print(describe[describe.index("Events:") :])
    assert re.search(rf"{re.escape(GATE)}\s+True", describe)
    assert re.search(r"Ready\s+True", describe)
    lines = describe[describe.index("Events:") :].splitlines()
    # On the node cache the agent seals before the sidecar mounts (its client's
    # start-up scan then finds every block); the app starts after the mount.
    expected = ["Scheduled", "Started", "WarmupStarted", "ModelsReady", "MountReady"]
    positions = []
    for reason in expected:
        index = next((i for i, line in enumerate(lines) if re.search(rf"\s{reason}\s", line)), None)
        assert index is not None, f"no {reason} Event:\n{describe}"
        positions.append(index)
    assert positions == sorted(positions), list(zip(expected, positions, strict=True))
    assert "kubelet" in describe
    assert "juicefs-mount" in describe


def test_the_app_reads_the_node_s_verified_copy_and_no_juicefs_runs_for_it(
    cluster: Cluster, node: Node, running: Running, example_model: Manifest
) -> None:
    """The node cache's default (cache.localCopy): the agent sealed the Bento from its
    verified copy on the node's disk, and that copy, bound read-only, is the app's whole
    view. The pod runs no JuiceFS client and has no FUSE mount. (A pod that reads FUSE
    has its juicefs killed and remounted in test_sidecar_faults.)"""
    uid = running.pod["metadata"]["uid"]
    assert juicefs_pids(uid) == []
    assert not [m for m in node.mounts("fuse.juicefs") if uid in str(m)]
    gate = condition(get_pod(cluster, NAMESPACE, running.name), GATE)
    assert gate is not None
    assert "the app reads that copy, not FUSE" in gate["message"], gate
    shown = wait_event(cluster, NAMESPACE, running.name, "MountReady", timeout=10)
    assert "no JuiceFS client runs in this pod" in shown["message"], shown
    shard = max(example_model.files, key=lambda f: f.size)
    code, output = exec_in(
        cluster, NAMESPACE, running.name, "main", "sha256sum", f"{MODELS}/{shard.path}"
    )
    assert code == 0, output
    assert output.split()[0] == shard.sha256


def test_deleting_the_pod_unmounts_and_leaves_nothing_on_the_node(
    cluster: Cluster, node: Node, running: Running
) -> None:
    uid = running.pod["metadata"]["uid"]
    grace = running.pod["spec"]["terminationGracePeriodSeconds"]
    assert [m for m in node.mounts() if uid in str(m)], "the pod's models are mounted"
    # Scale to zero so the Deployment does not replace it, then watch it go.
    started = time.monotonic()
    cluster.kubectl("scale", "deployment", DEPLOYMENT, "-n", NAMESPACE, "--replicas=0")
    wait_for(
        lambda: (
            cluster.kubectl("get", "pod", running.name, "-n", NAMESPACE, check=False).returncode
            != 0
        ),
        timeout=grace + 30,
        what=f"pod {running.name} to be gone",
    )
    seconds = time.monotonic() - started
    print(f"pod gone {seconds:.1f}s after the scale-down (grace period {grace}s)")
    assert seconds < grace
    wait_for(
        lambda: (
            not [m for m in node.mounts("fuse.juicefs") if uid in str(m)] and not juicefs_pids(uid)
        ),
        timeout=30,
        what="no JuiceFS mount or process left on the node",
    )
    leftovers = [m for m in node.mounts() if uid in str(m)]
    assert leftovers == [], leftovers
