"""The local node itself: what it says it is, who it is, and that it leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common.mounts import mounts
from devcluster import Cluster
from devcluster.images import PAUSE_IMAGE, PROJECT_IMAGE, SAMPLE_BENTO_IMAGE, containerd_images
from devcluster.node.host import PRIVATE_HOST_DIRS, socket_dir
from devcluster.node.mountns import KUBELET_SYSCTLS
from devcluster.node.netns import NETNS_DIR, NodeNetwork
from devcluster.node.node import GKE_SSD, Node

REPO = Path(__file__).resolve().parents[2]


def test_the_node_looks_like_a_gke_local_ssd_l4_node(cluster: Cluster, node: Node) -> None:
    found = cluster.get_json("node", node.name)
    labels = found["metadata"]["labels"]
    assert labels[GKE_SSD] == "true"
    assert labels["cloud.google.com/gke-accelerator"] == "nvidia-l4"
    assert labels["node.kubernetes.io/instance-type"] == "g2-standard-8"
    capacity = found["status"]["capacity"]
    assert capacity["cpu"] == "8"
    assert capacity["memory"] == "32Gi"
    assert capacity["nvidia.com/gpu"] == "1"
    assert not [t for t in found["spec"].get("taints") or [] if "not-ready" in t["key"]]
    info = found["status"]["nodeInfo"]
    assert info["kubeletVersion"].startswith("v1.37.2")
    assert info["containerRuntimeVersion"] == "containerd://2.4.2"
    addresses = {a["type"]: a["address"] for a in found["status"]["addresses"]}
    assert addresses["InternalIP"] == node.network.node_ip
    assert not addresses["InternalIP"].startswith("127.")


def test_the_kubelet_is_a_node_identity_not_a_superuser(cluster: Cluster, node: Node) -> None:
    kubeconfig = node.dir / "kubelet.kubeconfig"

    def as_kubelet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [cluster.kubectl_path, f"--kubeconfig={kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    whoami = json.loads(as_kubelet("auth", "whoami", "-o", "json").stdout)["status"]["userInfo"]
    assert whoami["username"] == f"system:node:{node.name}"
    assert "system:nodes" in whoami["groups"]
    assert "system:masters" not in whoami["groups"]
    # The Node authorizer: no Secret unless a pod on this node uses it.
    assert as_kubelet("auth", "can-i", "list", "secrets", "-A").stdout.startswith("no")
    denied = as_kubelet("get", "secret", "bento-juicefs-injector-ca", "-n", "bento-juicefs-system")
    assert denied.returncode != 0
    # NodeRestriction: it may not label another node.
    other = as_kubelet("label", "node", "some-other-node", "x=y")
    assert other.returncode != 0


def test_the_images_were_imported_without_a_registry(node: Node) -> None:
    assert node.containerd is not None
    found = containerd_images(node.binaries["ctr"], str(node.containerd_paths.socket))
    for image in (PAUSE_IMAGE, PROJECT_IMAGE, SAMPLE_BENTO_IMAGE):
        assert image in found, sorted(found)


def _host_state() -> dict[str, set[str]]:
    """Host-wide things a node could change: mounts, directories, iptables, sysctls."""
    iptables = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False)
    return {
        "mounts": {str(m.point) for m in mounts()},
        "host dirs": {d for d in PRIVATE_HOST_DIRS if Path(d).exists()},
        "iptables": {line for line in iptables.stdout.splitlines() if line and line[0] not in "#:"},
        "sysctls": {
            f"{name}={Path('/proc/sys', name).read_text().strip()}" for name in KUBELET_SYSCTLS
        },
    }


def _node_traces(network: NodeNetwork, state: Path) -> list[str]:
    """What of one node (by its network's names) is still on the host."""
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout
    found = [f"netns {network.netns}"] if (NETNS_DIR / network.netns).exists() else []
    found += (
        [f"veth {network.host_veth}"]
        if Path(f"/sys/class/net/{network.host_veth}").exists()
        else []
    )
    found += [f"route {line}" for line in routes.splitlines() if line.startswith(network.pod_cidr)]
    found += [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{network.netns}") if p.is_dir()]
    found += [str(socket_dir(network))] if socket_dir(network).exists() else []
    found += [f"mount {m.point}" for m in mounts() if m.point.is_relative_to(state)]
    return found


def test_cluster_up_and_down_leave_nothing_behind(node: Node) -> None:
    """`make cluster-up` then `make cluster-down` (beside the session's cluster)."""
    before = _host_state()
    # Short: the kubelet binds unix sockets under it (107 bytes at most).
    state = Path(tempfile.mkdtemp(prefix="bj-up-"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    up = subprocess.run(
        [sys.executable, "-m", "devcluster", "up", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    network: NodeNetwork | None = None
    try:
        assert up.returncode == 0, up.stderr[-4000:]
        recorded = json.loads((state / "controlplane.json").read_text())["node"]
        network = NodeNetwork(**recorded["network"])
        assert network != node.network, "a second node network beside the session's"
        kubeconfig = up.stdout.strip().splitlines()[-1]
        nodes = subprocess.run(
            [str(node.binaries.get("kubectl", "kubectl")), f"--kubeconfig={kubeconfig}",
             "get", "nodes", "-o", "json"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        ready = [
            c["status"]
            for n in json.loads(nodes.stdout)["items"]
            for c in n["status"]["conditions"]
            if c["type"] == "Ready"
        ]
        assert ready == ["True"]
        assert _node_traces(network, state), "the second node was really there"
    finally:
        down = subprocess.run(
            [sys.executable, "-m", "devcluster", "down", "--state-dir", str(state)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            check=False,
        )
    assert down.returncode == 0, down.stderr[-4000:]
    assert network is not None
    assert _node_traces(network, state) == []
    after = _host_state()
    assert after["sysctls"] == before["sysctls"]
    assert after["host dirs"] <= before["host dirs"]
    assert after["iptables"] == before["iptables"]
    left = [p for p in os.listdir("/proc") if p.isdigit() and str(state) in _cmdline(int(p))]
    assert left == [], left
    shutil.rmtree(state, ignore_errors=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
