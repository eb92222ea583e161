"""Faults for the real node's pods: a path cut off, a cache disk that is full.

    with PathCut(node.network, "10.213.64.7", "172.31.213.1", 6443):  # that pod loses the apiserver
        ...
    with FullDirectory(node.mount_ns, cache_dir, size_mib=48, free_mib=2):   # a full cache disk
        ...

A cut is an iptables DROP in the node's network namespace, in a chain of its
own jumped to first from FORWARD: a pod's traffic is routed through the node
(after kube-proxy has DNATed a Service IP, so the rule sees the real
address), while the kubelet's own traffic (OUTPUT) and every other pod's go
on as before. Packets vanish, as behind a dead link: connections hang
until their clients time out. A full directory is a small tmpfs mounted in
the node's mount namespace (where containerd resolves hostPaths) and filled
to a chosen free space; stop() unmounts it and what was there shows again.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path
from typing import Self

from devcluster.lifecycle import StartStop
from devcluster.node.mountns import NodeMountNamespace
from devcluster.node.netns import NodeNetwork

MIB = 1 << 20
_serial = itertools.count()


class FaultError(RuntimeError):
    """A command that makes or removes a fault failed; the message names it."""


def _run(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise FaultError(f"`{' '.join(args)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


class PathCut(StartStop):
    """Drop what `source` (a pod IP) sends to destination:port, from start() to stop()."""

    def __init__(self, network: NodeNetwork, source: str, destination: str, port: int) -> None:
        self.network = network
        self.source = source
        self.destination = destination
        self.port = port
        self.chain = f"BJFS-CUT-{os.getpid() % 100000}-{next(_serial)}"
        self.active = False

    def _iptables(self, *args: str, check: bool = True) -> str:
        cmd = [*self.network.nsenter(), "iptables", "-w", *args]
        if check:
            return _run(cmd)
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout

    def start(self) -> Self:
        self._iptables("-N", self.chain)
        rule = ["-s", self.source, "-d", self.destination, "-p", "tcp", "--dport", str(self.port)]
        self._iptables("-A", self.chain, *rule, "-j", "DROP")
        # First in FORWARD: before kube-proxy's ACCEPT of established connections.
        self._iptables("-I", "FORWARD", "1", "-j", self.chain)
        self.active = True
        return self

    def dropped_packets(self) -> int:
        """Packets the cut has dropped so far."""
        out = self._iptables("-L", self.chain, "-v", "-x", "-n", check=False)
        for line in out.splitlines():
            fields = line.split()
            if "DROP" in fields and fields[0].isdigit():
                return int(fields[0])
        return 0

    def stop(self) -> None:
        if not self.active:
            return
        self._iptables("-D", "FORWARD", "-j", self.chain, check=False)
        self._iptables("-F", self.chain, check=False)
        self._iptables("-X", self.chain, check=False)
        self.active = False


class FullDirectory(StartStop):
    """`path` inside the node becomes a size_mib tmpfs with only free_mib left free."""

    def __init__(
        self, mount_ns: NodeMountNamespace, path: Path, *, size_mib: int = 48, free_mib: int = 2
    ) -> None:
        if not 0 <= free_mib < size_mib:
            raise ValueError(f"free_mib {free_mib} must be below size_mib {size_mib}")
        self.mount_ns = mount_ns
        self.path = Path(path)
        self.size_mib = size_mib
        self.free_mib = free_mib
        self.mounted = False

    def _in_node(self, *args: str) -> str:
        return _run(["nsenter", f"--mount={self.mount_ns.ns_file}", "--", *args])

    def start(self) -> Self:
        self.path.mkdir(parents=True, exist_ok=True)  # the same directory inside the node
        self._in_node("mount", "-t", "tmpfs", "-o", f"size={self.size_mib}m,mode=0755", "tmpfs",
                      str(self.path))  # fmt: skip
        self.mounted = True
        try:
            fill = self.path / ".bento-juicefs-fill"
            length = (self.size_mib - self.free_mib) * MIB
            self._in_node("fallocate", "-l", str(length), str(fill))
        except BaseException:
            self.stop()
            raise
        return self

    def space(self) -> tuple[int, int]:
        """(total bytes, bytes available) of the directory, as seen inside the node."""
        out = self._in_node("stat", "-f", "-c", "%b %a %S", str(self.path)).split()
        blocks, available, size = (int(v) for v in out)
        return blocks * size, available * size

    def files(self) -> list[str]:
        """What is in the directory inside the node, relative paths (the fill file left out)."""
        out = self._in_node("find", str(self.path), "-type", "f")
        names = [str(Path(line).relative_to(self.path)) for line in out.splitlines() if line]
        return sorted(n for n in names if n != ".bento-juicefs-fill")

    def stop(self) -> None:
        if not self.mounted:
            return
        proc = subprocess.run(
            ["nsenter", f"--mount={self.mount_ns.ns_file}", "--", "umount", str(self.path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:  # busy (a juicefs still has it open): detach it now
            self._in_node("umount", "-l", str(self.path))
        self.mounted = False
