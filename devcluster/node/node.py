"""A real node: containerd, the kubelet and kube-proxy in a namespace of their own.

The node lives in its own network namespace (`devcluster.node.netns`) and mount
namespace (`devcluster.node.mountns`), as a kind node lives in its container.
The kubelet authenticates as `system:node:NAME` (Node authorizer and
NodeRestriction), registers with the labels of a GKE local-SSD GPU pool node
and advertises that node's shape (CPU and memory through the faked machine
view, the GPU as an extended resource on its status). Images come from
`devcluster.images` (no registry is reachable) and are imported into
containerd's `k8s.io` namespace, where the kubelet never garbage-collects them.

What this machine needs from a kubelet (see ../shared/notes/real-node.md):
cgroup v1 with the cgroupfs driver (`failCgroupV1: false`), no swap check,
a non-loopback node IP, image GC off, and, with the node-lifecycle
controller off, the `not-ready` taint removed once the node is Ready.
Everything the node writes outside its directory is inside its namespaces
(iptables chains, pod network namespaces, mounts) or under its own cgroup
root; `stop()` removes all of it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.mounts import mounts
from common.processes import log_tail, spawn_group, stop_group
from devcluster.cluster import NOT_READY_TAINT, Cluster, wait_for
from devcluster.control.pki import ClusterPKI, write_kubeconfig
from devcluster.images import PAUSE_IMAGE
from devcluster.node.config import kube_proxy_config, kubelet_config, kubelet_root_problem
from devcluster.node.containerd import Containerd, ContainerdPaths, cni_config, containerd_config
from devcluster.node.host import (
    CREATED_HOST_DIRS,
    PRIVATE_HOST_DIRS,
    kubelet_root_dir,
    make_cgroups,
    node_cache_dir,
    node_cgroup_root,
    pids_in_mount_ns,
    socket_dir,
    teardown_node,
)
from devcluster.node.mountns import MachineShape, NodeMountNamespace
from devcluster.node.netns import NodeNetwork
from devcluster.packages import ensure_packages

GKE_SSD = "cloud.google.com/gke-ephemeral-storage-local-ssd"
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
# What the node needs from Debian: command (or path) -> package.
NODE_PACKAGES: dict[str, str] = {
    "runc": "runc",
    "iptables": "iptables",  # kubelet and kube-proxy chains, inside the node's netns
    "conntrack": "conntrack",  # kube-proxy clears stale UDP entries with it
    "nsenter": "util-linux",
    str(CNI_BIN_DIR / "bridge"): "containernetworking-plugins",
}


class NodeError(RuntimeError):
    """The node did not come up; the message names the component and its log tail."""


@dataclass(frozen=True)
class NodeSpec:
    """What the node says it is: a GKE local-SSD pool node with one NVIDIA L4."""

    name: str = "gke-l4-ssd-pool-1"
    labels: Mapping[str, str] = field(
        default_factory=lambda: {
            "cloud.google.com/gke-nodepool": "l4-ssd-pool",
            "cloud.google.com/gke-accelerator": "nvidia-l4",
            "cloud.google.com/machine-family": "g2",
            GKE_SSD: "true",
            "cloud.google.com/gke-image-streaming": "true",
            "node.kubernetes.io/instance-type": "g2-standard-8",
            "topology.kubernetes.io/region": "us-central1",
            "topology.kubernetes.io/zone": "us-central1-a",
        }
    )
    shape: MachineShape = field(default_factory=MachineShape)
    # Advertised on the node's status as a device plugin would.
    extended_resources: Mapping[str, str] = field(default_factory=lambda: {"nvidia.com/gpu": "1"})
    # Taints it registers with (kubelet --register-with-taints), as a node pool
    # created with them: "key=value:Effect".
    taints: tuple[str, ...] = ()


class Node:
    """One node on a running control plane; `start()` returns once it is Ready."""

    def __init__(
        self,
        directory: Path,
        cluster: Cluster,
        pki: ClusterPKI,
        network: NodeNetwork,
        binaries: Mapping[str, Path],
        *,
        spec: NodeSpec | None = None,
        import_images: Callable[[Path, Path], None] | None = None,
        log: Callable[[str], None] = print,
        shown_as: Path | None = None,
    ) -> None:
        self.dir = Path(directory).resolve()
        # Where the node's kubelet root and node cache appear inside its mount
        # namespace: the first node's paths on every node of a cluster, as real
        # nodes all have /var/lib/kubelet, so one DaemonSet's hostPaths fit all.
        self.shown_as = Path(shown_as).resolve() if shown_as is not None else self.dir
        self.cluster = cluster
        self.pki = pki
        self.network = network
        self.binaries = dict(binaries)
        self.spec = spec or NodeSpec()
        self.import_images = import_images
        self.log = log
        self.mount_ns = NodeMountNamespace(self.dir)
        self.containerd_paths = ContainerdPaths(self.dir / "containerd", socket_dir(network))
        self.containerd: Containerd | None = None
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._created_host_dirs: list[str] = []
        self.timings: dict[str, float] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kubelet_root(self) -> Path:
        """The kubelet's --root-dir: pods' volumes are under <it>/pods/<uid>/volumes.

        The path inside the node; on the host, a node shown as another's has
        it at `kubelet_root_dir(node.dir)`."""
        return kubelet_root_dir(self.shown_as)

    @property
    def cgroup_root(self) -> str:
        return node_cgroup_root(self.network)

    @property
    def prefix(self) -> list[str]:
        return self.network.nsenter(mount_ns=self.mount_ns.ns_file)

    def log_path(self, component: str) -> Path:
        return self.dir / "logs" / f"{component}.log"

    # -- start ----------------------------------------------------------------

    def start(self, server: str, timeout: float = 90.0) -> None:
        """Bring the node up against the apiserver at `server` (reachable from the node)."""
        problem = kubelet_root_problem(self.kubelet_root)
        if problem is not None:
            raise NodeError(problem)
        started = time.monotonic()
        try:
            self._start(server, timeout)
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = round(time.monotonic() - started, 2)
        self.log(f"node {self.name} Ready in {self.timings['total']:.1f}s ({self.timings})")

    def _mark(self, what: str, since: float) -> float:
        now = time.monotonic()
        self.timings[what] = round(now - since, 2)
        return now

    def _start(self, server: str, timeout: float) -> None:
        t = time.monotonic()
        if self.dir.exists():
            shutil.rmtree(self.dir)
        (self.dir / "logs").mkdir(parents=True)
        self.mount_ns.create(self.spec.shape)
        for host_dir in PRIVATE_HOST_DIRS:
            private = self.dir / "private" / host_dir.strip("/").replace("/", "_")
            private.mkdir(parents=True)
            if not Path(host_dir).exists():
                # A bind mount needs its target: record it, so teardown removes it.
                Path(host_dir).mkdir(parents=True)
                self._created_host_dirs.append(host_dir)
                (self.dir / CREATED_HOST_DIRS).write_text(json.dumps(self._created_host_dirs))
            self.mount_ns.run("mount", "--bind", str(private), host_dir)
        if self.shown_as != self.dir:
            for own, shown in (
                (kubelet_root_dir(self.dir), kubelet_root_dir(self.shown_as)),
                (node_cache_dir(self.dir), node_cache_dir(self.shown_as)),
            ):
                own.mkdir(parents=True, exist_ok=True)
                shown.mkdir(parents=True, exist_ok=True)
                self.mount_ns.run("mount", "--bind", str(own), str(shown))
                # Shared, as the kubelet makes its root dir where it is no mount yet:
                # the agent's Bidirectional mounts must reach the pods.
                self.mount_ns.run("mount", "--make-rshared", str(shown))
        make_cgroups(self.cgroup_root)
        t = self._mark("namespaces", t)

        paths = self.containerd_paths
        runc = ensure_packages(NODE_PACKAGES)["runc"]
        containerd = Containerd(
            paths,
            containerd=self.binaries["containerd"],
            shim_dir=self.binaries["containerd-shim-runc-v2"].parent,
            ctr=self.binaries["ctr"],
            prefix=self.prefix,
        )
        self.containerd = containerd
        containerd.write_config(
            containerd_config(
                paths, sandbox_image=PAUSE_IMAGE, runc=runc, cni_bin_dirs=[CNI_BIN_DIR]
            ),
            cni_config(paths, self.network.pod_cidr),
        )
        containerd.start()
        t = self._mark("containerd", t)
        if self.import_images is not None:
            self.import_images(self.binaries["ctr"], paths.socket)
        t = self._mark("images", t)

        client, serving = self.pki.issue_node(self.name, self.network.node_ip)
        kubeconfig = write_kubeconfig(
            self.dir / "kubelet.kubeconfig",
            server=server,
            ca_cert=self.pki.ca.cert,
            client=client,
            user=f"system:node:{self.name}",
        )
        resolv = self.dir / "resolv.conf"
        # No cluster DNS and no route out: pods resolve nothing but their hosts file.
        resolv.write_text("options ndots:1\n")
        config = self.dir / "kubelet.yaml"
        config.write_text(
            yaml.safe_dump(
                kubelet_config(
                    node_ip=self.network.node_ip,
                    ca_file=self.pki.ca.cert,
                    serving=serving,
                    runtime_endpoint=paths.endpoint,
                    pod_logs_dir=self.dir / "pods-logs",
                    resolv_conf=resolv,
                    cluster_dns=self.network.host_ip,
                    cgroup_root=self.cgroup_root,
                ),
                sort_keys=False,
            )
        )
        labels = ",".join(f"{k}={v}" for k, v in self.spec.labels.items())
        self._spawn(
            "kubelet",
            str(self.binaries["kubelet"]),
            f"--config={config}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={self.kubelet_root}",
            f"--cert-dir={self.dir / 'kubelet-pki'}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.network.node_ip}",
            f"--node-labels={labels}",
            *([f"--register-with-taints={','.join(self.spec.taints)}"] if self.spec.taints else []),
            "--v=2",
        )
        proxy_kubeconfig = write_kubeconfig(
            self.dir / "kube-proxy.kubeconfig",
            server=server,
            ca_cert=self.pki.ca.cert,
            client=self.pki.kube_proxy,
            user="system:kube-proxy",
        )
        proxy_config = self.dir / "kube-proxy.yaml"
        proxy_config.write_text(
            yaml.safe_dump(
                kube_proxy_config(
                    kubeconfig=proxy_kubeconfig, node=self.name, pod_cidr=self.network.pod_cidr
                )
            )
        )
        self._spawn("kube-proxy", str(self.binaries["kube-proxy"]), f"--config={proxy_config}")

        deadline = time.monotonic() + timeout
        self._wait_ready(deadline)
        t = self._mark("kubelet", t)
        self._advertise()
        self._mark("advertised", t)

    def _spawn(self, name: str, *args: str) -> None:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        self._processes[name] = spawn_group([*self.prefix, *args], self.log_path(name), env=env)

    def _check_alive(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is not None:
                raise NodeError(
                    f"{name} exited with code {process.returncode}:\n"
                    f"{log_tail(self.log_path(name), 40)}"
                )
        if self.containerd is not None and not self.containerd.running:
            raise NodeError(f"containerd exited:\n{log_tail(self.containerd_paths.log)}")

    def _wait_ready(self, deadline: float) -> None:
        while True:
            self._check_alive()
            proc = self.cluster.kubectl("get", "node", self.name, "-o", "json", check=False)
            if proc.returncode == 0:
                conditions = json.loads(proc.stdout).get("status", {}).get("conditions") or []
                if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                    return
            if time.monotonic() > deadline:
                raise NodeError(
                    f"node {self.name} not Ready in time:\n{log_tail(self.log_path('kubelet'), 40)}"
                )
            time.sleep(0.2)

    def _advertise(self) -> None:
        """Extended resources on the status (as a device plugin would), the not-ready taint off."""
        if self.spec.extended_resources:
            status = {
                "status": {
                    "capacity": dict(self.spec.extended_resources),
                    "allocatable": dict(self.spec.extended_resources),
                }
            }
            self.cluster.kubectl(
                "patch", "node", self.name, "--subresource=status", "--type=merge",
                "-p", json.dumps(status),
            )  # fmt: skip
        # TaintNodesByCondition adds it at registration; with the node-lifecycle
        # controller off (fake nodes have no heartbeat) nothing else removes it.
        wait_for(
            self._untaint,
            timeout=30,
            what=f"the {NOT_READY_TAINT} taint to leave node {self.name}",
        )

    def _untaint(self) -> bool:
        """True once the taint is gone; otherwise remove it and look again next time."""
        taints = self.cluster.get_json("node", self.name).get("spec", {}).get("taints") or []
        kept = [t for t in taints if t.get("key") != NOT_READY_TAINT]
        if kept == taints:
            return True
        patch = [{"op": "replace", "path": "/spec/taints", "value": kept}]
        self.cluster.kubectl(
            "patch", "node", self.name, "--type=json", "-p", json.dumps(patch), check=False
        )
        return False

    # -- inspection ---------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every process in the node's mount namespace (containerd, shims, kubelet...)."""
        return pids_in_mount_ns(self.mount_ns.ns_file)

    def mounts(self, fstype: str | None = None) -> list[Path]:
        """Mount points inside the node (optionally of one fstype, e.g. fuse.juicefs)."""
        pids = [p for p in (self._pid("kubelet"), self._pid("containerd")) if p]
        if not pids:
            return []
        return [m.point for m in mounts(pids[0]) if fstype is None or m.fstype == fstype]

    def _pid(self, name: str) -> int | None:
        process = self._processes.get(name)
        if name == "containerd" and self.containerd is not None:
            process = self.containerd.process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def running(self) -> dict[str, bool]:
        state = {name: p.poll() is None for name, p in self._processes.items()}
        if self.containerd is not None:
            state["containerd"] = self.containerd.running
        return state

    # -- stop -----------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> None:
        """Stop everything the node runs and remove what it made; safe to repeat."""
        for name in ("kube-proxy", "kubelet"):
            process = self._processes.pop(name, None)
            if process is not None:
                stop_group(process, timeout)
        if self.containerd is not None:
            self.containerd.stop(timeout)
        teardown_node(self.dir, self.network)
