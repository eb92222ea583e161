"""The settings this kind of machine needs from a node, as the config builders write them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from devcluster.cli import MAX_NODES, node_count
from devcluster.control.pki import KeyPair
from devcluster.control.plane import sibling_name
from devcluster.node.config import (
    UNIX_SOCKET_PATH_MAX,
    kube_proxy_config,
    kubelet_config,
    kubelet_root_problem,
)
from devcluster.node.containerd import ContainerdPaths, cni_config, containerd_config
from devcluster.node.mountns import MachineShape
from devcluster.node.netns import NodeNetwork, cross_node_routes, forwarding_switch


def test_containerd_clamps_oom_score_and_keeps_netns_and_opt_in_its_dirs(tmp_path: Path) -> None:
    paths = ContainerdPaths(tmp_path / "containerd", Path("/run/bento-juicefs/n"))
    config = containerd_config(
        paths, sandbox_image="localhost/pause:1", runc=Path("/usr/sbin/runc"), cni_bin_dirs=[]
    )
    assert "restrict_oom_score_adj = true" in config  # no CAP_SYS_RESOURCE here
    assert "netns_mounts_under_state_dir = true" in config
    assert f'path = "{tmp_path / "containerd" / "opt"}"' in config
    assert 'sandbox = "localhost/pause:1"' in config
    assert 'address = "/run/bento-juicefs/n/containerd.sock"' in config
    assert len(str(paths.socket)) < 108  # sun_path


def test_cni_is_a_bridge_over_the_pod_cidr_with_ipam_in_our_dir(tmp_path: Path) -> None:
    paths = ContainerdPaths(tmp_path, tmp_path)
    network = json.loads(json.dumps(cni_config(paths, "10.213.64.0/24")))
    bridge = network["plugins"][0]
    assert bridge["type"] == "bridge"
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.213.64.0/24"}]]
    assert bridge["ipam"]["dataDir"] == str(tmp_path / "cni" / "ipam")
    assert [p["type"] for p in network["plugins"]] == ["bridge", "portmap"]


def test_kubelet_runs_on_cgroup_v1_without_swap_checks_or_image_gc(tmp_path: Path) -> None:
    config = kubelet_config(
        node_ip="172.31.213.2",
        ca_file=tmp_path / "ca.crt",
        serving=KeyPair(tmp_path / "s.crt", tmp_path / "s.key"),
        runtime_endpoint="unix:///run/x.sock",
        pod_logs_dir=tmp_path / "logs",
        resolv_conf=tmp_path / "resolv.conf",
        cluster_dns="172.31.213.1",
        cgroup_root="/bento-juicefs-node",
    )
    assert config["failCgroupV1"] is False
    assert config["cgroupDriver"] == "cgroupfs"
    assert config["failSwapOn"] is False
    assert config["imageGCHighThresholdPercent"] == 100
    assert config["address"] == "172.31.213.2"
    assert config["authorization"] == {"mode": "Webhook"}
    assert config["authentication"]["anonymous"] == {"enabled": False}  # type: ignore[index]


def test_kube_proxy_touches_no_host_wide_sysctl(tmp_path: Path) -> None:
    config = kube_proxy_config(kubeconfig=tmp_path / "k", node="n", pod_cidr="10.213.64.0/24")
    assert config["conntrack"] == {
        "maxPerCore": 0,
        "min": 0,
        "tcpEstablishedTimeout": "0s",
        "tcpCloseWaitTimeout": "0s",
    }
    assert config["iptables"] == {"localhostNodePorts": False}


def test_the_machine_shape_counts_cpus_with_the_real_ids_only(tmp_path: Path) -> None:
    node_dir = MachineShape(cpus=8, memory_gib=32).write_sysfs(tmp_path, real_cpus=2)
    cpus = sorted(p.relative_to(node_dir).as_posix() for p in node_dir.glob("node*/cpu*"))
    assert len(cpus) == 8
    assert {p.split("/")[1] for p in cpus} == {"cpu0", "cpu1"}  # a cpuset of 0-1 only
    meminfo = MachineShape(memory_gib=32).meminfo("MemTotal: 1 kB\nSwapTotal: 0 kB\n")
    assert "MemTotal:        33554432 kB" in meminfo
    assert "SwapTotal: 0 kB" in meminfo


def test_node_networks_do_not_overlap() -> None:
    first, second = NodeNetwork.numbered(0), NodeNetwork.numbered(1)
    assert first == NodeNetwork()
    assert {first.host_ip, first.node_ip}.isdisjoint({second.host_ip, second.node_ip})
    assert first.pod_cidr != second.pod_cidr
    assert first.netns != second.netns


def test_each_node_of_a_cluster_routes_its_peers_pods_and_the_hosts_addresses_via_the_host() -> (
    None
):
    nodes = [NodeNetwork.numbered(i) for i in range(3)]
    routes = cross_node_routes(nodes[1], nodes)
    assert routes == [
        (nodes[0].pod_cidr, nodes[1].host_ip),
        (f"{nodes[0].host_ip}/32", nodes[1].host_ip),
        (nodes[2].pod_cidr, nodes[1].host_ip),
        (f"{nodes[2].host_ip}/32", nodes[1].host_ip),
    ]
    assert cross_node_routes(nodes[0], nodes[:1]) == []
    assert forwarding_switch(nodes[2]).as_posix().endswith("/conf/bjfs-host2/forwarding")


def test_the_nodes_after_the_first_are_numbered_like_a_pool_s() -> None:
    assert sibling_name("gke-l4-ssd-pool-1", 3) == "gke-l4-ssd-pool-3"
    assert sibling_name("worker", 2) == "worker-2"


@pytest.mark.parametrize("text", ["0", "9", "three", "-1"])
def test_a_node_count_out_of_range_is_refused_with_what_is_accepted(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"from 1 to {MAX_NODES}"):
        node_count(text)
    assert node_count("3") == 3


def test_a_state_dir_too_deep_for_the_kubelets_sockets_is_refused_with_the_reason() -> None:
    assert kubelet_root_problem(Path("/tmp/pytest-of-root/pytest-12/cluster0/node/kubelet")) is None
    deep = Path(
        "/tmp/pytest-of-root/pytest-124/test_cluster_up_and_down_leave0/cluster/node/kubelet"
    )
    problem = kubelet_root_problem(deep)
    assert problem is not None
    assert f"{UNIX_SOCKET_PATH_MAX}-byte limit" in problem
    assert "bytes shorter" in problem
