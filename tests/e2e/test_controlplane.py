"""The local control plane is a real cluster: version, controllers, scheduler, clean stop."""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.ports import port_is_free
from devcluster import Cluster, ComponentError, ControlPlane, Ports, wait_for

from .conftest import EXTERNAL_KUBECONFIG

SSD_LABEL = "cloud.google.com/gke-ephemeral-storage-local-ssd"
FAKE_LABEL = "e2e.bento-juicefs/fake-node"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"


def _suffix() -> str:
    return uuid.uuid4().hex[:6]


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"e2e-{_suffix()}"
    cluster.create_namespace(name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _pod(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [{"name": "app", "image": PAUSE_IMAGE, **spec.pop("container", {})}],
            **spec,
        },
    }


def test_version(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("get", "--raw", "/version").stdout)
    assert version["major"] == "1"
    if not EXTERNAL_KUBECONFIG:
        assert version["gitVersion"] == "v1.37.2"
        assert version["minor"] == "37"


def test_deployment_gets_replicaset_and_pods(cluster: Cluster, namespace: str) -> None:
    labels = {"app": "hello"}
    cluster.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "hello", "namespace": namespace},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "app", "image": PAUSE_IMAGE}]},
                },
            },
        }
    )

    def owned_pods() -> list[dict[str, Any]]:
        rs = cluster.get_json("replicasets", "-n", namespace, "-l", "app=hello")["items"]
        pods = cluster.get_json("pods", "-n", namespace, "-l", "app=hello")["items"]
        rs_names = {r["metadata"]["name"] for r in rs}
        return [
            p
            for p in pods
            if {o["name"] for o in p["metadata"].get("ownerReferences", [])} & rs_names
        ]

    def two_pods() -> list[dict[str, Any]] | None:
        found = owned_pods()
        return found if len(found) == 2 else None

    pods = wait_for(two_pods, timeout=30, what="2 pods owned by the Deployment's ReplicaSet")
    assert all(p["spec"]["containers"][0]["image"] == PAUSE_IMAGE for p in pods)


@pytest.fixture
def fake_nodes(cluster: Cluster) -> Iterator[tuple[str, str]]:
    suffix = _suffix()
    ssd, plain = f"e2e-ssd-{suffix}", f"e2e-plain-{suffix}"
    # A label of their own: the real node (an SSD node too) stays out of the test.
    own = {FAKE_LABEL: suffix}
    cluster.register_fake_node(ssd, {SSD_LABEL: "true", **own}, ephemeral_storage="375Gi")
    cluster.register_fake_node(plain, own, ephemeral_storage="100Gi")
    yield ssd, plain
    cluster.kubectl("delete", "node", ssd, plain, "--wait=false", check=False)


def test_scheduler_binds_by_node_affinity_and_ephemeral_storage(
    cluster: Cluster, namespace: str, fake_nodes: tuple[str, str]
) -> None:
    ssd, _plain = fake_nodes
    node = cluster.get_json("node", ssd)
    own = {"key": FAKE_LABEL, "operator": "In", "values": [node["metadata"]["labels"][FAKE_LABEL]]}
    assert node["status"]["allocatable"]["ephemeral-storage"] == "375Gi"
    assert not [t for t in node["spec"].get("taints") or [] if t["effect"] != "PreferNoSchedule"]

    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": SSD_LABEL, "operator": "In", "values": ["true"]},
                            own,
                        ]
                    }
                ]
            }
        }
    }
    fits = _pod(
        "fits",
        affinity=affinity,
        container={"resources": {"requests": {"ephemeral-storage": "100Gi"}}},
    )
    too_big = _pod(
        "too-big",
        affinity=affinity,
        container={"resources": {"requests": {"ephemeral-storage": "1000Gi"}}},
    )
    for pod in (fits, too_big):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))

    bound = wait_for(
        lambda: cluster.get_json("pod", "fits", "-n", namespace)["spec"].get("nodeName"),
        timeout=30,
        what="pod 'fits' to be bound",
    )
    assert bound == ssd

    def failed_scheduling() -> list[str]:
        events = cluster.get_json(
            "events",
            "-n",
            namespace,
            "--field-selector",
            "involvedObject.name=too-big,reason=FailedScheduling",
        )["items"]
        return [e["message"] for e in events]

    messages = wait_for(failed_scheduling, timeout=30, what="a FailedScheduling event")
    assert any("ephemeral-storage" in m for m in messages), messages
    pod = cluster.get_json("pod", "too-big", "-n", namespace)
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


def _listening_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.usefixtures("local_only")
def test_stop_leaves_no_process_or_port(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp")
    with cp:
        assert cp.startup_seconds is not None
        assert 0 < cp.startup_seconds < cp.timeout
        assert cp.kubeconfig == tmp_path / "cp" / "admin.kubeconfig"
        assert cp.kubectl("get", "serviceaccount", "default").returncode == 0
        pids = cp.pids
        ports = [p for p in vars(cp.ports).values() if p]
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"}
        assert set(ports) <= _listening_ports()
        print(f"startup {cp.startup_seconds}s {cp.timings}")
    assert [name for name, pid in pids.items() if not _gone(pid)] == []
    assert set(ports) & _listening_ports() == set()
    assert all(port_is_free(p) for p in ports)
    assert not (tmp_path / "cp" / "controlplane.json").exists()


@pytest.mark.usefixtures("local_only")
def test_port_in_use_names_the_component(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cp = ControlPlane(tmp_path / "cp", ports=Ports(etcd=port))
        with pytest.raises(ComponentError, match=rf"^etcd: port 127.0.0.1:{port} .*in use"):
            cp.start()
    assert cp.pids == {}


@pytest.mark.usefixtures("local_only")
def test_component_exiting_early_reports_its_log(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp", extra_args={"kube-apiserver": ["--no-such-flag"]})
    with pytest.raises(ComponentError) as excinfo:
        cp.start()
    err = excinfo.value
    assert err.component == "kube-apiserver"
    assert str(err).startswith("kube-apiserver: exited early with code")
    assert "unknown flag: --no-such-flag" in str(err)  # from the log tail
    assert cp.pids == {}
    assert port_is_free(cp.ports.etcd)  # etcd, already running, was stopped again
