"""An object store behind a shaped link: its own network namespace, veths, tc.

On two cores an object store on loopback is limited by the CPU, not by
bandwidth; S3 is limited per client by the network. So the store (MinIO)
runs in a network namespace of its own, reached over veths whose store-side
egress (what carries GET bodies) is shaped with tc: a token bucket at a set
rate (`tbf`), and optionally an S3-like first-byte latency on every request
(this kernel has no netem: `devcluster.storage.latency` relays new connections and
holds each request for the delay). The metadata engine stays where it is,
unshaped.

    net = StoreNetwork()
    net.create()                      # namespace, veth to the host, the store's address
    net.link_node(node_network)       # and a veth straight to a node's namespace
    net.link_node(second_node, 1)     # one more for each further node, shaped alike
    ObjectStore(..., host=net.store_ip, port=STORE_PORT, netns=net.netns)
    shaper = Shaper(net, log_dir)
    shaper.apply(LinkProfile(mb_per_s=200, delay_ms=30))   # for new connections
    shaper.apply(None)                                     # unshaped again
    net.delete()                      # relay, qdiscs, veths and the namespace, idempotent

The store's address is a /32 on the namespace's loopback, routed over each
link: the host and the node reach the same address (the one the JuiceFS
volume records in its format), each through its own veth, and no forwarding
is turned on anywhere (the store namespace is the end of both links).
The names and addresses are fixed (172.31.214.0/24, and 172.31.215.0/24 for
the links to the second node on, clear of the node networks' 172.31.213.0/24):
one shaped store per host at a time, and a crashed run's leftovers are
removed by the next `create()`.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.ports import port_answers
from common.processes import log_tail, spawn_group, stop_group
from devcluster.node.netns import (
    NetworkError,
    NodeNetwork,
    delete_netns,
    ip,
    link_exists,
    netns_exists,
    netns_in_use,
)
from devcluster.packages import ensure_packages

STORE_PORT = 9000
RELAY_PORT = 9002  # the latency relay, inside the store's namespace


@dataclass(frozen=True)
class LinkProfile:
    """The shape of the store's egress: a rate in MB/s (10^6 bytes), an optional delay."""

    mb_per_s: float = 200.0
    delay_ms: float = 0.0

    @property
    def name(self) -> str:
        latency = f"+{self.delay_ms:g}ms" if self.delay_ms else ""
        return f"{self.mb_per_s:g}MBps{latency}"

    @property
    def rate_mbit(self) -> int:
        return round(self.mb_per_s * 8)

    def qdisc_commands(self, dev: str) -> list[str]:
        """`tc` arguments that put this rate on dev's egress (replacing what is there)."""
        return [
            *("qdisc", "replace", "dev", dev, "root", "handle", "1:", "tbf"),
            *("rate", f"{self.rate_mbit}mbit", "burst", "512kb", "latency", "50ms"),
        ]


def tc(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run `tc ARGS` (inside netns when given); stdout."""
    binary = ensure_packages({"tc": "iproute2"})["tc"]
    cmd = [str(binary), *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetworkError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class StoreNetwork:
    """Names and addresses of the store's network; create() and delete() are idempotent."""

    netns: str = "bento-juicefs-store"
    host_veth: str = "bjfs-sthost"  # host end of the host link
    store_host_veth: str = "bjfs-st0"  # store end of the host link
    node_veth: str = "bjfs-stnode"  # node end of the node link (inside the node's namespace)
    store_node_veth: str = "bjfs-st1"  # store end of the node link
    host_link_cidr: str = "172.31.214.0/30"
    node_link_cidr: str = "172.31.214.4/30"
    store_ip: str = "172.31.214.10"
    # The links to the second node on: a /30 each in <this>.0/24.
    more_node_links: str = "172.31.215"

    @staticmethod
    def _ends(cidr: str) -> tuple[str, str, int]:
        link = ipaddress.IPv4Network(cidr)
        return str(link.network_address + 1), str(link.network_address + 2), link.prefixlen

    @property
    def host_ip(self) -> str:
        return self._ends(self.host_link_cidr)[0]

    @property
    def store_egress(self) -> list[str]:
        """The store-side veths whose egress carries what the store sends: to the host and
        to each node linked."""
        found = [self.store_host_veth]
        index = 0
        while link_exists(store_veth := self.node_link(index)[0], self.netns):
            found.append(store_veth)
            index += 1
        return found

    def create(self) -> None:
        """The namespace, the veth to the host, the store's address and routes."""
        self.delete()
        host_end, store_end, prefix = self._ends(self.host_link_cidr)
        ip("netns", "add", self.netns)
        ip("link", "set", "lo", "up", netns=self.netns)
        ip("addr", "add", f"{self.store_ip}/32", "dev", "lo", netns=self.netns)
        ip("link", "add", self.host_veth, "type", "veth", "peer", "name", self.store_host_veth)
        ip("link", "set", self.store_host_veth, "netns", self.netns)
        ip("addr", "add", f"{host_end}/{prefix}", "dev", self.host_veth)
        ip("link", "set", self.host_veth, "up")
        ip("addr", "add", f"{store_end}/{prefix}", "dev", self.store_host_veth, netns=self.netns)
        ip("link", "set", self.store_host_veth, "up", netns=self.netns)
        ip("route", "add", f"{self.store_ip}/32", "via", store_end, "dev", self.host_veth)

    def node_link(self, index: int) -> tuple[str, str]:
        """(store-side veth, /30) of the link to the index-th node (0: the first node)."""
        if index == 0:
            return self.store_node_veth, self.node_link_cidr
        return f"bjfs-st{index + 1}", f"{self.more_node_links}.{4 * index}/30"

    def link_node(self, node: NodeNetwork, index: int = 0) -> None:
        """A veth straight between the store and a node's namespace, for the node's pods
        (index: which node of several, each its own link and its own shaped egress).

        The node routes the store's address over it; the store routes the
        node's pod CIDR back (pods are not masqueraded on the local node).
        """
        store_veth, cidr = self.node_link(index)
        store_end, node_end, prefix = self._ends(cidr)
        ip("link", "add", store_veth, "type", "veth", "peer", "name", self.node_veth)
        ip("link", "set", store_veth, "netns", self.netns)
        ip("link", "set", self.node_veth, "netns", node.netns)
        ip("addr", "add", f"{store_end}/{prefix}", "dev", store_veth, netns=self.netns)
        ip("link", "set", store_veth, "up", netns=self.netns)
        ip("addr", "add", f"{node_end}/{prefix}", "dev", self.node_veth, netns=node.netns)
        ip("link", "set", self.node_veth, "up", netns=node.netns)
        ip("route", "add", f"{self.store_ip}/32", "via", store_end, netns=node.netns)
        ip("route", "add", node.pod_cidr, "via", node_end, netns=self.netns)

    def sent_bytes(self, index: int) -> int:
        """Bytes the store has sent over its link to the index-th node (the veth's tx)."""
        store_veth, _ = self.node_link(index)
        text = ip("-j", "-s", "link", "show", "dev", store_veth, netns=self.netns)
        (link,) = json.loads(text)
        return int(link["stats64"]["tx"]["bytes"])

    def shape(self, profile: LinkProfile | None) -> None:
        """Put profile's rate on the egress of every store-side veth (None: unshaped)."""
        for dev in self.store_egress:
            tc("qdisc", "del", "dev", dev, "root", netns=self.netns, check=False)
            if profile is not None:
                tc(*profile.qdisc_commands(dev), netns=self.netns)

    def qdiscs(self) -> str:
        """What tc shows on the store-side veths (for the record)."""
        return "".join(
            tc("qdisc", "show", "dev", dev, netns=self.netns) for dev in self.store_egress
        )

    def delete(self) -> None:
        """Remove the namespace (its veth ends, their qdiscs and peers go with it)."""
        delete_netns(self.netns, self.host_veth)

    def exists(self) -> bool:
        return netns_in_use(self.netns, self.host_veth)

    def nsenter(self) -> list[str]:
        """The command prefix that runs a program inside the store's namespace."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--"]

    def redirect_rule(self, port: int) -> list[str]:
        """The iptables rule (nat PREROUTING) sending new connections for port to the relay."""
        return [
            *("PREROUTING", "-p", "tcp", "-d", self.store_ip, "--dport", str(port)),
            *("-j", "DNAT", "--to-destination", f"{self.store_ip}:{RELAY_PORT}"),
        ]


class Shaper:
    """Applies a LinkProfile to a StoreNetwork: the rate now, the delay for new connections."""

    def __init__(self, net: StoreNetwork, log_dir: Path, port: int = STORE_PORT) -> None:
        self.net = net
        self.port = port
        self.log_path = Path(log_dir) / "latency-relay.log"
        self.profile: LinkProfile | None = None
        self._relay: subprocess.Popen[bytes] | None = None

    def _iptables(self, *args: str, check: bool = True) -> None:
        binary = ensure_packages({"iptables": "iptables"})["iptables"]
        cmd = [*self.net.nsenter(), str(binary), "-w", "-t", "nat", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if check and proc.returncode != 0:
            raise NetworkError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")

    def apply(self, profile: LinkProfile | None) -> None:
        self.net.shape(profile)
        self._stop_relay()
        self.profile = profile
        if profile is None or not profile.delay_ms:
            return
        self._relay = spawn_group(
            [
                *self.net.nsenter(),
                sys.executable,
                "-m",
                "devcluster.storage.latency",
                "--listen",
                f"{self.net.store_ip}:{RELAY_PORT}",
                "--to",
                f"{self.net.store_ip}:{self.port}",
                "--delay-ms",
                f"{profile.delay_ms:g}",
            ],
            self.log_path,
            cwd=Path(__file__).resolve().parents[2],
            die_with_parent=True,  # a crashed benchmark leaves no relay behind
        )
        deadline = time.monotonic() + 10
        # Reachable from the host only through the DNAT: wait for the rule's target first.
        while not port_answers(RELAY_PORT, self.net.store_ip):
            if self._relay.poll() is not None or time.monotonic() > deadline:
                raise NetworkError(f"latency relay did not start:\n{log_tail(self.log_path)}")
            time.sleep(0.05)
        self._iptables("-A", *self.net.redirect_rule(self.port))

    def _stop_relay(self) -> None:
        self._iptables("-D", *self.net.redirect_rule(self.port), check=False)
        relay, self._relay = self._relay, None
        if relay is not None:
            stop_group(relay, 5)

    def clear(self) -> None:
        """No relay, no rule, no qdisc (the namespace itself stays)."""
        self._stop_relay()
        if netns_exists(self.net.netns):
            self.net.shape(None)
        self.profile = None
