"""The node's network: its own network namespace, a veth to the host, routes.

A kind node lives in a container with its own network stack; ours lives in
a network namespace made here. The veth's host end carries the address the
host's services (kube-apiserver, MinIO, Redis) listen on for the node; the
node end carries the node IP (the kubelet refuses a loopback one). The node
namespace gets no default route (only the Service CIDR, which kube-proxy
DNATs): pods reach the host's services and nothing else, so test traffic
never leaves the machine. The host gets one route, to
the pod CIDR through the node, so the apiserver can call webhook pods.

Several nodes of one cluster (`connect_nodes`) reach each other's pods
through the host: each node routes its peers' pod CIDRs, and the host
addresses its services listen on, via its own veth, and the host forwards
between those veths only (the per-interface `forwarding` switch of each
host end; the host-wide `ip_forward` stays as it is).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

NETNS_DIR = Path("/run/netns")


class NetworkError(RuntimeError):
    """An `ip` command failed; the message names the command and its stderr."""


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run `ip ARGS` (inside netns when given); stdout."""
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetworkError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def link_exists(name: str, netns: str | None = None) -> bool:
    return bool(ip("-o", "link", "show", "dev", name, netns=netns, check=False).strip())


def delete_netns(netns: str, host_veth: str) -> None:
    """Remove a namespace (the veth ends in it go with it) and the host end of its veth."""
    if netns_exists(netns):
        ip("netns", "delete", netns, check=False)
    if link_exists(host_veth):
        ip("link", "delete", host_veth, check=False)


def netns_in_use(netns: str, host_veth: str) -> bool:
    """The namespace or the host end of its veth is there (ours, or a crashed run's)."""
    return netns_exists(netns) or link_exists(host_veth)


@dataclass(frozen=True)
class NodeNetwork:
    """Names and addresses of one node's network; `create()` and `delete()` are idempotent."""

    netns: str = "bento-juicefs-node"
    host_veth: str = "bjfs-host0"
    node_veth: str = "bjfs-node0"
    link_cidr: str = "172.31.213.0/30"
    pod_cidr: str = "10.213.64.0/24"
    service_cidr: str = "10.0.0.0/24"

    @classmethod
    def numbered(cls, index: int) -> NodeNetwork:
        """The index-th of several node networks on one host (index 0 is the default)."""
        return cls(
            netns=f"bento-juicefs-node{index or ''}",
            host_veth=f"bjfs-host{index}",
            node_veth=f"bjfs-node{index}",
            link_cidr=f"172.31.213.{4 * index}/30",
            pod_cidr=f"10.213.{64 + index}.0/24",
        )

    @classmethod
    def first_free(cls, limit: int = 16) -> NodeNetwork:
        """The lowest-numbered node network not in use on this host."""
        for index in range(limit):
            network = cls.numbered(index)
            if not network.exists():
                return network
        raise NetworkError(f"all {limit} node networks are in use (ip netns list)")

    @property
    def _link(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.link_cidr)

    @property
    def host_ip(self) -> str:
        """Where the host's services listen for the node (the veth's host end)."""
        return str(self._link.network_address + 1)

    @property
    def node_ip(self) -> str:
        return str(self._link.network_address + 2)

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    def create(self) -> None:
        """The namespace, the veth pair with its addresses, and the routes."""
        self.delete()
        prefix = self._link.prefixlen
        ip("netns", "add", self.netns)
        ip("link", "add", self.host_veth, "type", "veth", "peer", "name", self.node_veth)
        ip("link", "set", self.node_veth, "netns", self.netns)
        ip("addr", "add", f"{self.host_ip}/{prefix}", "dev", self.host_veth)
        ip("link", "set", self.host_veth, "up")
        ip("link", "set", "lo", "up", netns=self.netns)
        ip("addr", "add", f"{self.node_ip}/{prefix}", "dev", self.node_veth, netns=self.netns)
        ip("link", "set", self.node_veth, "up", netns=self.netns)
        ip("route", "add", self.pod_cidr, "via", self.node_ip, "dev", self.host_veth)
        # Service IPs are DNATed by kube-proxy inside the node; a route must exist
        # for the node's own connections (hostNetwork pods) to get that far.
        ip("route", "add", self.service_cidr, "via", self.host_ip, netns=self.netns)
        # Pods are routed through the node (per-namespace sysctl: the host's stays as it is).
        subprocess.run(
            ["nsenter", f"--net={self.netns_path}", "sysctl", "-qw", "net.ipv4.ip_forward=1"],
            check=True,
            capture_output=True,
        )

    def delete(self) -> None:
        """Remove the namespace (its end of the veth goes with it) and the host end."""
        delete_netns(self.netns, self.host_veth)

    def exists(self) -> bool:
        return netns_in_use(self.netns, self.host_veth)

    def nsenter(self, *, mount_ns: Path | None = None) -> list[str]:
        """The command prefix that runs a program inside the node (its network, its mounts)."""
        prefix = ["nsenter", f"--net={self.netns_path}"]
        if mount_ns is not None:
            prefix.append(f"--mount={mount_ns}")
        return [*prefix, "--"]


def cross_node_routes(
    network: NodeNetwork, cluster: Sequence[NodeNetwork]
) -> list[tuple[str, str]]:
    """(destination, via) routes that node `network` needs inside its namespace to reach
    the other nodes of `cluster`: each peer's pod CIDR, and the host end of each peer's
    veth (the first node's is where the apiserver and the storage listen), via the host."""
    routes: list[tuple[str, str]] = []
    for peer in cluster:
        if peer.netns != network.netns:
            routes += [(peer.pod_cidr, network.host_ip), (f"{peer.host_ip}/32", network.host_ip)]
    return routes


def forwarding_switch(network: NodeNetwork) -> Path:
    """The host's per-interface IPv4 forwarding switch for the node's veth."""
    return Path("/proc/sys/net/ipv4/conf") / network.host_veth / "forwarding"


def connect_nodes(cluster: Sequence[NodeNetwork]) -> None:
    """Make the nodes of one cluster reach each other's pods and the host's services.

    Idempotent (`ip route replace`); call it again whenever a node joins.
    """
    for network in cluster:
        for destination, via in cross_node_routes(network, cluster):
            ip("route", "replace", destination, "via", via, netns=network.netns)
        if len(cluster) > 1:
            forwarding_switch(network).write_text("1\n")


def in_netns(name: str) -> bool:
    """This process runs in the named network namespace."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat(NETNS_DIR / name).st_ino
    except OSError:
        return False
