"""The node's mount namespace, and the machine shape the node advertises.

containerd, the kubelet and kube-proxy run in a mount namespace of their
own, as a kind node runs in a container: every mount they make (volumes,
pod network namespaces, container rootfs, the FUSE mounts the sidecars
propagate out) stays inside it and goes away with it, never touching the
host's mount table. The namespace is kept alive by a bind mount of its nsfs
file (so `nsenter --mount=FILE` enters it) and is created with private
propagation, so nothing leaks back to the host.

The same namespace carries the machine shape the node reports: the kubelet
(cAdvisor) counts CPUs in /sys/devices/system/node and reads memory from
/proc/meminfo, so bind-mounting generated copies over those paths makes
the node advertise the shape of a cloud GPU node (e.g. a GKE g2-standard-8:
8 vCPU, 32 GiB) on a 2-core machine. Only the kubelet's view changes;
containers get their own /proc and /sys, and the scheduler and the
kubelet's admission then accept the pods a real node of that shape would.
It also shields the host's sysctls from the kubelet (`KUBELET_SYSCTLS`).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from common.mounts import is_mounted, unmount


class MountNamespaceError(RuntimeError):
    """A mount command failed; the message names it and its stderr."""


def _run(*args: str) -> None:
    proc = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise MountNamespaceError(f"`{' '.join(args)}` failed: {proc.stderr.strip()}")


@dataclass(frozen=True)
class MachineShape:
    """What the node's kubelet sees of the machine."""

    cpus: int = 8
    memory_gib: int = 32

    def meminfo(self, real: str) -> str:
        """The real /proc/meminfo text with the memory size replaced.

        cAdvisor reads MemTotal (and SwapTotal, so the rest stays); the
        kubelet's eviction manager reads cgroups, not this file.
        """
        kib = self.memory_gib << 20
        sized = {"MemTotal", "MemFree", "MemAvailable"}
        lines = []
        for line in real.splitlines():
            key = line.split(":", 1)[0]
            lines.append(f"{key}:{kib:>16} kB" if key in sized else line)
        return "\n".join(lines) + "\n"

    def write_sysfs(self, root: Path, real_cpus: int) -> Path:
        """A /sys/devices/system/node tree under root that counts `cpus` CPUs; its path.

        cAdvisor counts a CPU per `nodeN/cpuM` entry, while the kubelet's
        cpuset for its pods is the set of CPU ids. On cgroup v1 that cpuset
        is written to the kernel, which refuses ids that do not exist; so
        every fake NUMA node lists the machine's real CPU ids again, and the
        count grows while the cpuset stays the real one.
        """
        node_dir = root / "node"
        numa_nodes = max(1, self.cpus // max(1, real_cpus))
        kib = (self.memory_gib << 20) // numa_nodes
        for index in range(numa_nodes):
            numa = node_dir / f"node{index}"
            for cpu in range(real_cpus):
                topology = numa / f"cpu{cpu}" / "topology"
                topology.mkdir(parents=True, exist_ok=True)
                (topology / "core_id").write_text(f"{cpu}\n")
                (topology / "physical_package_id").write_text(f"{index}\n")
            (numa / "meminfo").write_text(f"Node {index} MemTotal:       {kib} kB\n")
            (numa / "distance").write_text(" ".join(["10"] * numa_nodes) + "\n")
        return node_dir


# The kubelet "fixes" these host-wide sysctls when they differ from what it
# wants (kernel.panic_on_oops=1 would reboot this machine on an oops); inside
# the node they read as the kubelet wants them and the host keeps its own.
KUBELET_SYSCTLS: dict[str, str] = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}


@dataclass(frozen=True)
class NodeMountNamespace:
    """A persistent mount namespace under `dir` (ns file `dir/mnt`)."""

    dir: Path

    @property
    def ns_file(self) -> Path:
        return self.dir / "ns" / "mnt"

    def create(self, shape: MachineShape | None = None) -> Path:
        """Make the namespace (and the faked machine shape in it); the ns file."""
        self.delete()
        ns_dir = self.ns_file.parent
        ns_dir.mkdir(parents=True, exist_ok=True)
        # An nsfs bind mount must not sit on a shared mount (it would propagate into itself).
        _run("mount", "--bind", str(ns_dir), str(ns_dir))
        _run("mount", "--make-private", str(ns_dir))
        self.ns_file.touch()
        _run("unshare", f"--mount={self.ns_file}", "--propagation", "private", "true")
        fake = self.dir / "machine"
        binds: list[tuple[Path, str]] = []
        for name, value in KUBELET_SYSCTLS.items():
            copy = fake / "sysctl" / name.replace("/", ".")
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(f"{value}\n")
            binds.append((copy, f"/proc/sys/{name}"))
        if shape is not None:
            meminfo = fake / "meminfo"
            meminfo.write_text(shape.meminfo(Path("/proc/meminfo").read_text()))
            node_dir = shape.write_sysfs(fake, real_cpus=os.cpu_count() or 1)
            binds += [(meminfo, "/proc/meminfo"), (node_dir, "/sys/devices/system/node")]
        for source, target in binds:
            self.run("mount", "--bind", str(source), target)
        return self.ns_file

    def run(self, *args: str) -> None:
        """Run a command inside the namespace; MountNamespaceError if it fails."""
        _run("nsenter", f"--mount={self.ns_file}", "--", *args)

    def exists(self) -> bool:
        return is_mounted(self.ns_file)

    def delete(self) -> None:
        """Drop the namespace: once no process is left in it, its mounts are gone too."""
        ns_dir = self.ns_file.parent
        if is_mounted(self.ns_file):
            unmount(self.ns_file)
        if is_mounted(ns_dir):
            unmount(ns_dir)
