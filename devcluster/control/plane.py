"""A real, local Kubernetes control plane from upstream binaries (envtest-style).

etcd, kube-apiserver, kube-controller-manager and kube-scheduler run as
subprocesses, each in its own process group, logging to
`<state_dir>/logs/<name>.log`; the apiserver listens on 127.0.0.1 or, with a
`node`, on the host end of that node's veth. With `node=NodeSpec(...)` a real
node (containerd + kubelet + kube-proxy, `devcluster.node.node`) joins once the
control plane is up, and `node_count` > 1 real nodes in all (`add_node`,
also for a node that joins later; `remove_node`); without one, Nodes are API
objects (`register_fake_node`) whose pods get scheduled but never run.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from common.ports import free_port, port_is_free
from common.processes import LOG_TAIL_LINES, log_tail, spawn_group, stop_group
from devcluster.binaries import CONTROL_PLANE_COMPONENTS, NODE_COMPONENTS, ensure_binaries
from devcluster.cluster import Cluster
from devcluster.control.components import (
    apiserver_args,
    controller_manager_args,
    etcd_args,
    scheduler_args,
)
from devcluster.control.pki import (
    APISERVER_HOSTS,
    APISERVER_KUBELET_CLIENT,
    ClusterPKI,
    write_kubeconfig,
)
from devcluster.lifecycle import StartStop
from devcluster.node.netns import NodeNetwork, connect_nodes
from devcluster.node.node import Node, NodeSpec

Hook = Callable[["ControlPlane"], None]

STATE_FILE = "controlplane.json"
# Directories and files under state_dir that start() recreates from scratch.
_OWNED = (
    "etcd",
    "pki",
    "logs",
    "certs",
    "kubeconfigs",
    "node",
    "storage",
    "injector",
    "admin.kubeconfig",
    STATE_FILE,
)
# The directories of the nodes after the first: node2, node3...
_NODE_DIRS = re.compile(r"node\d+")


def sibling_name(first: str, number: int) -> str:
    """The name of a cluster's number-th node, after its first: pool-1 -> pool-3."""
    stem = re.sub(r"-\d+$", "", first)
    return f"{stem}-{number}"


class ComponentError(RuntimeError):
    """A component failed to start; the message names it and ends with its log tail."""

    def __init__(self, component: str, problem: str, log: Path | None = None) -> None:
        self.component = component
        self.problem = problem
        self.log = log
        message = f"{component}: {problem}"
        if log is not None:
            message += f"\n--- last {LOG_TAIL_LINES} lines of {log} ---\n{log_tail(log)}"
        super().__init__(message)


@dataclass
class Ports:
    """127.0.0.1 ports; 0 means pick a free one at start()."""

    etcd: int = 0
    etcd_peer: int = 0
    apiserver: int = 0
    controller_manager: int = 0
    scheduler: int = 0

    def owner(self, name: str) -> str:
        return {
            "etcd": "etcd",
            "etcd_peer": "etcd",
            "apiserver": "kube-apiserver",
            "controller_manager": "kube-controller-manager",
            "scheduler": "kube-scheduler",
        }[name]


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


def _stderr_log(message: str) -> None:
    print(f"[devcluster {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class ControlPlane(Cluster, StartStop):
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler on 127.0.0.1.

    `start()` wipes what it owns under `state_dir`, writes fresh PKI and
    kubeconfigs, starts the components one after another and returns once the
    apiserver is ready, the controller-manager has created the `default`
    ServiceAccount and the scheduler's /healthz answers; then runs `on_ready`
    hooks. `stop()` runs `on_stop` hooks (reverse order) and stops the
    components in reverse order.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        ports: Ports | None = None,
        binaries: Mapping[str, Path] | None = None,
        timeout: float = 120.0,
        stop_timeout: float = 15.0,
        extra_args: Mapping[str, Sequence[str]] | None = None,
        on_ready: Iterable[Hook] = (),
        on_stop: Iterable[Hook] = (),
        log: Callable[[str], None] = _stderr_log,
        die_with_parent: bool = True,
        host: str = "127.0.0.1",
        node: NodeSpec | None = None,
        network: NodeNetwork | None = None,
        import_images: Callable[[Path, Path], None] | None = None,
        node_count: int = 1,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        super().__init__(
            self.state_dir / "admin.kubeconfig",
            (binaries or {}).get("kubectl", "kubectl"),
        )
        self.ports = ports or Ports()
        self.binaries: dict[str, Path] = dict(binaries or {})
        self.timeout = timeout
        self.stop_timeout = stop_timeout
        self.extra_args = {k: list(v) for k, v in (extra_args or {}).items()}
        self.on_ready: list[Hook] = list(on_ready)
        self.on_stop: list[Hook] = list(on_stop)
        self.log = log
        self.die_with_parent = die_with_parent
        # Where the apiserver listens and what it advertises: loopback, or the
        # host end of a node's veth so the node and its pods reach it too.
        self.host = host
        # With a node spec: a real node (containerd + kubelet + kube-proxy) in its
        # own network namespace; the apiserver then listens on the veth's host end.
        self.node_spec = node
        self.network = network or (NodeNetwork() if node is not None else None)
        self.import_images = import_images
        if node_count < 1:
            raise ValueError(f"node_count must be at least 1, not {node_count}")
        self.node_count = node_count
        # The real nodes, the first one first (the default for everything one node does).
        self.nodes: list[Node] = []
        self._numbers: dict[str, int] = {}
        self.pki = ClusterPKI(self.state_dir / "pki")
        self.logs_dir = self.state_dir / "logs"
        self.startup_seconds: float | None = None
        # Free-form room for on_ready hooks to leave state for their on_stop partner.
        self.addons: dict[str, object] = {}
        self.timings: dict[str, float] = {}
        self._processes: list[_Process] = []
        self._deadline = 0.0

    # -- public ---------------------------------------------------------------

    @property
    def server(self) -> str:
        if not self.ports.apiserver:
            raise RuntimeError("control plane not started: no apiserver port yet")
        return f"https://{self.host}:{self.ports.apiserver}"

    @property
    def node(self) -> Node | None:
        """The first real node: the one `make demo` and the one-node tests use."""
        return self.nodes[0] if self.nodes else None

    @property
    def pids(self) -> dict[str, int]:
        """Component name -> pid (also its process group id) of started processes."""
        return {p.name: p.popen.pid for p in self._processes}

    def running(self) -> dict[str, bool]:
        return {p.name: p.popen.poll() is None for p in self._processes}

    def start(self) -> None:
        if self._processes:
            raise RuntimeError("control plane already started")
        t0 = time.monotonic()
        self._deadline = t0 + self.timeout
        try:
            self._start()
            self.startup_seconds = round(time.monotonic() - t0, 2)
            self.log(f"control plane ready in {self.startup_seconds:.1f}s at {self.server}")
            self._write_state()
            for hook in self.on_ready:
                self.log(f"on_ready: {getattr(hook, '__name__', hook)}")
                hook(self)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop everything; safe to call more than once."""
        if self._processes:
            for hook in reversed(self.on_stop):
                try:
                    hook(self)
                except Exception as exc:
                    self.log(f"on_stop hook {getattr(hook, '__name__', hook)} failed: {exc!r}")
        # The first node last: the others show their paths over its.
        for node in reversed(self.nodes[1:]):
            self._stop_node(node)
        if self.node is not None:
            self.log(f"stopping node {self.node.name}")
            self.node.stop()
            self.nodes.clear()
        for proc in reversed(self._processes):
            self._terminate(proc)
        self._processes.clear()
        if self.network is not None:
            self.network.delete()
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)

    def log_path(self, component: str) -> Path:
        return self.logs_dir / f"{component}.log"

    # -- start-up ------------------------------------------------------------

    def _start(self) -> None:
        wanted = [*CONTROL_PLANE_COMPONENTS, *(NODE_COMPONENTS if self.node_spec else ())]
        if not all(c in self.binaries for c in wanted):
            self.binaries = {**ensure_binaries(wanted), **self.binaries}
        self.kubectl_path = str(self.binaries.get("kubectl", self.kubectl_path))
        self._reset_state_dir()
        if self.network is not None:
            self.network.create()
            self.host = self.network.host_ip
        self._pick_ports()
        self.log(f"state dir {self.state_dir}; ports {asdict(self.ports)}")

        pki = ClusterPKI.create(self.pki.dir, hosts=(*APISERVER_HOSTS, self.host))
        self.pki = pki
        write_kubeconfig(
            self.kubeconfig, server=self.server, ca_cert=pki.ca.cert, client=pki.admin, user="admin"
        )
        kcm_kubeconfig = write_kubeconfig(
            self.state_dir / "kubeconfigs" / "controller-manager.kubeconfig",
            server=self.server,
            ca_cert=pki.ca.cert,
            client=pki.controller_manager,
            user="system:kube-controller-manager",
        )
        sched_kubeconfig = write_kubeconfig(
            self.state_dir / "kubeconfigs" / "scheduler.kubeconfig",
            server=self.server,
            ca_cert=pki.ca.cert,
            client=pki.scheduler,
            user="system:kube-scheduler",
        )
        admin_tls = ssl.create_default_context(cafile=str(pki.ca.cert))
        admin_tls.load_cert_chain(str(pki.admin.cert), str(pki.admin.key))
        self_signed = ssl.create_default_context()
        self_signed.check_hostname = False
        self_signed.verify_mode = ssl.CERT_NONE

        etcd_url = f"http://127.0.0.1:{self.ports.etcd}"
        peer_url = f"http://127.0.0.1:{self.ports.etcd_peer}"
        self._spawn("etcd", *etcd_args(self.state_dir / "etcd", etcd_url, peer_url))
        self._wait("etcd", lambda: b'"health":"true"' in _http_get(f"{etcd_url}/health", None, 200))

        certs = self.state_dir / "certs"
        self._spawn(
            "kube-apiserver",
            *apiserver_args(self.host, self.ports.apiserver, etcd_url, certs, pki),
        )
        self._wait(
            "kube-apiserver",
            lambda: _http_get(f"{self.server}/readyz", admin_tls, 200) == b"ok",
        )

        self._spawn(
            "kube-controller-manager",
            *controller_manager_args(kcm_kubeconfig, self.ports.controller_manager, certs, pki),
        )
        self._spawn(
            "kube-scheduler", *scheduler_args(sched_kubeconfig, self.ports.scheduler, certs)
        )
        self._wait(
            "kube-scheduler",
            lambda: (
                _http_get(f"https://127.0.0.1:{self.ports.scheduler}/healthz", self_signed, 200)
                == b"ok"
            ),
        )
        self._wait(
            "kube-controller-manager",
            lambda: (
                _http_get(
                    f"https://127.0.0.1:{self.ports.controller_manager}/healthz", self_signed, 200
                )
                == b"ok"
                and bool(
                    _http_get(
                        f"{self.server}/api/v1/namespaces/default/serviceaccounts/default",
                        admin_tls,
                        200,
                    )
                )
            ),
            what="/healthz and ServiceAccount default/default",
        )
        # The apiserver's client identity towards kubelets (kubectl logs/exec).
        self.kubectl(
            "create",
            "clusterrolebinding",
            "kube-apiserver-kubelet-client",
            "--clusterrole=system:kubelet-api-admin",
            f"--user={APISERVER_KUBELET_CLIENT[0]}",
        )
        if self.node_spec is not None and self.network is not None:
            first = Node(
                self.state_dir / "node",
                self,
                pki,
                self.network,
                self.binaries,
                spec=self.node_spec,
                import_images=self.import_images,
                log=self.log,
            )
            self.nodes.append(first)
            self._numbers[first.name] = 1
            first.start(self.server, timeout=max(30.0, self._deadline - time.monotonic()))
            self.timings["node"] = first.timings["total"]
            for _ in range(1, self.node_count):
                joined = self.add_node()
                self.timings[f"node {joined.name}"] = joined.timings["total"]

    # -- nodes ---------------------------------------------------------------

    def add_node(self, timeout: float = 90.0, taints: Sequence[str] = ()) -> Node:
        """Start one more real node like the first (a node joining the pool); it once Ready.

        It gets the next number (gke-l4-ssd-pool-2, -3...), the first free node
        network on this host, routes to and from the other nodes' pods, and its
        own directory `node<number>`, whose kubelet root and node cache it shows
        at the first node's paths. `taints` ("key=value:Effect"): what it registers
        with, beside the first node's.
        """
        first = self.node
        if first is None or self.node_spec is None:
            raise RuntimeError("add_node needs a control plane started with a real node")
        number = max(self._numbers.values()) + 1
        spec = dataclasses.replace(
            self.node_spec,
            name=sibling_name(first.name, number),
            taints=(*self.node_spec.taints, *taints),
        )
        network = NodeNetwork.first_free()
        network.create()
        node = Node(
            self.state_dir / f"node{number}",
            self,
            self.pki,
            network,
            self.binaries,
            spec=spec,
            import_images=self.import_images,
            log=self.log,
            shown_as=first.dir,
        )
        self.nodes.append(node)
        self._numbers[node.name] = number
        try:
            connect_nodes([n.network for n in self.nodes])
            node.start(self.server, timeout=timeout)
        except BaseException:
            self.nodes.remove(node)
            network.delete()
            raise
        self._write_state()
        return node

    def remove_node(self, node: Node) -> None:
        """Stop a node other than the first, remove what it made and its Node object
        (a node leaving the pool; drain it first to move its pods)."""
        if node is self.node:
            raise ValueError("the first node stays for the cluster's life; remove another")
        self._stop_node(node)
        self.kubectl("delete", "node", node.name, "--ignore-not-found", "--wait=false")
        # What the pod garbage collector does for pods of a gone node, at once:
        # a DaemonSet's pod there must not pass for a running one meanwhile.
        self.kubectl(
            "delete", "pods", "--all-namespaces", f"--field-selector=spec.nodeName={node.name}",
            "--force", "--grace-period=0", "--wait=false", check=False,
        )  # fmt: skip
        self._write_state()

    def _stop_node(self, node: Node) -> None:
        self.log(f"stopping node {node.name}")
        node.stop()
        node.network.delete()
        self.nodes.remove(node)
        self._numbers.pop(node.name, None)

    def _reset_state_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        extra_nodes = [p.name for p in self.state_dir.iterdir() if _NODE_DIRS.fullmatch(p.name)]
        for name in (*_OWNED, *extra_nodes):
            path = self.state_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        self.logs_dir.mkdir()

    def _pick_ports(self) -> None:
        taken: set[int] = set()
        for f in fields(self.ports):
            port = getattr(self.ports, f.name)
            if port:
                if port in taken or not port_is_free(port):
                    raise ComponentError(
                        self.ports.owner(f.name),
                        f"port 127.0.0.1:{port} ({f.name}) is already in use",
                    )
            else:
                while (port := free_port()) in taken:
                    pass
                setattr(self.ports, f.name, port)
            taken.add(port)

    def _spawn(self, name: str, *args: str) -> None:
        for f in fields(self.ports):
            port = getattr(self.ports, f.name)
            if self.ports.owner(f.name) == name and not port_is_free(port):
                raise ComponentError(name, f"port 127.0.0.1:{port} ({f.name}) is already in use")
        cmd = [str(self.binaries[name]), *args, *self.extra_args.get(name, [])]
        log = self.log_path(name)
        self.log(f"starting {name}")
        popen = spawn_group(cmd, log, cwd=self.state_dir, die_with_parent=self.die_with_parent)
        self._processes.append(_Process(name, popen, log))
        self.timings[f"{name}.spawned"] = time.monotonic()

    def _wait(self, name: str, probe: Callable[[], bool], what: str = "") -> None:
        t0 = self.timings.get(f"{name}.spawned", time.monotonic())
        while True:
            for proc in self._processes:
                code = proc.popen.poll()
                if code is not None:
                    raise ComponentError(proc.name, f"exited early with code {code}", proc.log)
            if probe():
                break
            if time.monotonic() > self._deadline:
                raise ComponentError(
                    name,
                    f"not ready ({what or 'health check'}) within {self.timeout:.0f}s",
                    self.log_path(name),
                )
            time.sleep(0.1)
        self.timings[name] = round(time.monotonic() - t0, 2)
        self.timings.pop(f"{name}.spawned", None)
        self.log(f"{name} ready ({self.timings[name]:.1f}s)")

    def _write_state(self) -> None:
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "kubectl": self.kubectl_path,
            "pids": self.pids,
            "binaries": {k: str(v) for k, v in self.binaries.items()},
            "ports": asdict(self.ports),
            "startup_seconds": self.startup_seconds,
            "timings": {k: v for k, v in self.timings.items() if not k.endswith(".spawned")},
            "node": None if self.node is None else _node_state(self.node),
            "nodes": [_node_state(node) for node in self.nodes],
        }
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(path)

    # -- shutdown ------------------------------------------------------------

    def _terminate(self, proc: _Process) -> None:
        if proc.popen.poll() is None:
            self.log(f"stopping {proc.name} (pid {proc.popen.pid})")
        if not stop_group(proc.popen, self.stop_timeout):
            self.log(f"{proc.name} ignored SIGTERM for {self.stop_timeout:.0f}s; SIGKILLed")


def _node_state(node: Node) -> dict[str, object]:
    """What `python -m devcluster down` needs to tear a node down after a crash."""
    return {"name": node.name, "dir": str(node.dir), "network": asdict(node.network)}


def _http_get(url: str, context: ssl.SSLContext | None, status: int) -> bytes:
    """The body if the GET answered `status`, else b'' (including connection errors)."""
    try:
        with urllib.request.urlopen(url, context=context, timeout=2) as resp:
            body: bytes = resp.read()
            return body if resp.status == status else b""
    except (OSError, http.client.HTTPException):
        return b""
