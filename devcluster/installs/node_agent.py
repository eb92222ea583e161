"""The node agent on the local cluster: the shipped DaemonSet, as a real pod on the real node.

`manifests/base/node-agent.yaml` as users apply it, with what this machine
needs changed (the same changes a platform team makes in an overlay for its
own node cache path):

- the node cache hostPath is the local node's (devcluster's cache.nodePath,
  under the node's own directory), mounted at the same path inside;
- the kubelet root hostPath, its mount and `--kubelet-root` are the local
  kubelet's `--root-dir` (`<node dir>/kubelet`, where real nodes have
  /var/lib/kubelet), so the agent finds the pods' emptyDirs and its mounts
  there reach the pods;
- its config is the local injector's config file (same labels, volumes,
  node cache path and budget), in a ConfigMap of its own;
- shorter resync and retry periods, so tests see a change within seconds.

Its RBAC, ServiceAccount and fence policies come with the injector's install
(manifests/base); the DaemonSet is applied here, as a cluster add-on
(`start_node_agent`) right after the injector: every injected sidecar needs
it. That agent runs with `--no-prewarm` (it warms a Bento only when a pod
asks for it), so tests still see cold nodes; the tests of prewarming install
it with `prewarm=True` and put the default back with `restore()`.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import yaml

from devcluster.cluster import Cluster, wait_for
from devcluster.control.plane import ControlPlane
from devcluster.installs.injector_install import BASE, NAMESPACE, InjectorInstall
from devcluster.installs.injector_pods import PodInjector
from devcluster.installs.injector_process import LocalInjector

DAEMONSET = "bento-juicefs-node-agent"
CONFIG_MAP = "bento-juicefs-node-agent-local-config"
SELECTOR = "app.kubernetes.io/name=bento-juicefs-node-agent"
CONFIG_HASH = "bento-juicefs.devcluster/config-sha256"


def shipped_daemonset() -> dict[str, Any]:
    documents = yaml.safe_load_all((BASE / "node-agent.yaml").read_text())
    return next(d for d in documents if d and d["kind"] == "DaemonSet")


# The shipped DaemonSet's hostPath volumes, and which local path replaces each.
NODE_CACHE_VOLUME = "node-cache"
KUBELET_ROOT_VOLUME = "kubelet-root"
KUBELET_ROOT_FLAG = "--kubelet-root"


def local_daemonset(
    shipped: dict[str, Any], node_cache: str, kubelet_root: str, extra_args: list[str]
) -> dict[str, Any]:
    """The shipped DaemonSet with the local node cache path, kubelet root, config and periods.

    Each hostPath is rewritten with the mount that names it (the same path
    inside, as shipped); a hostPath this does not know fails loudly rather
    than pointing the agent at the real host's directory.
    """
    local_paths = {NODE_CACHE_VOLUME: node_cache, KUBELET_ROOT_VOLUME: kubelet_root}
    daemonset = copy.deepcopy(shipped)
    spec = daemonset["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = list(container["args"])
    for volume in spec["volumes"]:
        if "hostPath" in volume:
            if volume["name"] not in local_paths:
                raise ValueError(f"hostPath volume {volume['name']!r}: no local path for it")
            shipped_path = volume["hostPath"]["path"]
            local = local_paths[volume["name"]]
            volume["hostPath"]["path"] = local
            for mount in container["volumeMounts"]:
                if mount["name"] == volume["name"]:
                    assert mount["mountPath"] == shipped_path
                    mount["mountPath"] = local
            if volume["name"] == KUBELET_ROOT_VOLUME:
                index = args.index(KUBELET_ROOT_FLAG) + 1
                assert args[index] == shipped_path
                args[index] = local
        if "configMap" in volume:
            volume["configMap"]["name"] = CONFIG_MAP
    container["args"] = [*args, *extra_args]
    # The image is imported into the node's containerd; there is no registry.
    container["imagePullPolicy"] = "Never"
    return daemonset


def local_kubelet_root(cluster: Cluster) -> Path:
    """The local node's kubelet root dir (its --root-dir), the agent's kubelet-root hostPath."""
    node = cluster.node if isinstance(cluster, ControlPlane) else None
    if node is None:
        raise RuntimeError("the node agent runs on the local cluster's real node: there is none")
    return node.kubelet_root


class LocalNodeAgent:
    """Install, await and remove the agent's DaemonSet on the local cluster."""

    def __init__(self, cluster: Cluster, injector: InjectorInstall) -> None:
        self.cluster = cluster
        self.injector = injector

    def install(
        self,
        prewarm: bool = False,
        resync_seconds: float = 2,
        retry_seconds: float = 5,
        evict_after_seconds: float = 3600,
        cache: dict[str, Any] | None = None,
        timeout: float = 120,
    ) -> str:
        """Apply the DaemonSet; return its pod's name once it runs.

        `cache` overrides keys of the config's `cache` section for the agent
        alone (e.g. a small nodeBudget to test eviction with small models).
        """
        config = yaml.safe_load(self.injector.config_file.read_text())
        config["cache"] = {**config.get("cache", {}), **(cache or {})}
        text = yaml.safe_dump(config)
        self.cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": CONFIG_MAP, "namespace": NAMESPACE},
                "data": {"config.yaml": text},
            }
        )
        args = [
            "--resync-seconds",
            str(resync_seconds),
            "--retry-seconds",
            str(retry_seconds),
            "--evict-after-seconds",
            str(evict_after_seconds),
            "--log-level",
            "debug",
            # The dev node's cache shares the host's disk with everything else:
            # a margin of that disk would measure the host, not the node.
            "--disk-margin",
            "0",
            *([] if prewarm else ["--no-prewarm"]),
        ]
        daemonset = local_daemonset(
            shipped_daemonset(),
            str(self.injector.node_cache),
            str(local_kubelet_root(self.cluster)),
            args,
        )
        # A new config is a new pod (the agent reads its config once), as a
        # chart's checksum annotation does.
        template = daemonset["spec"]["template"]["metadata"]
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        template.setdefault("annotations", {})[CONFIG_HASH] = digest
        self.cluster.apply(daemonset)
        return wait_for(
            lambda: self.rolled_out(digest), timeout=timeout, what=f"the {DAEMONSET} pods to run"
        )

    def rolled_out(self, config_hash: str) -> str | None:
        """A running agent pod with that config, once every node the DaemonSet wants
        one on runs one with it (several nodes: a pod each)."""
        status = self.cluster.get_json("daemonset", DAEMONSET, "-n", NAMESPACE).get("status", {})
        pods = self.cluster.get_json("pods", "-n", NAMESPACE, "-l", SELECTOR)["items"]
        running = [p for p in pods if _runs(p) and _config_hash(p) == config_hash]
        if not running or len(running) < int(status.get("desiredNumberScheduled") or 1):
            return None
        return str(running[0]["metadata"]["name"])

    def running_pod(self, config_hash: str | None = None) -> str | None:
        """The agent pod that runs (with that config, if given), not one on its way out."""
        pods = self.cluster.get_json("pods", "-n", NAMESPACE, "-l", SELECTOR)["items"]
        for pod in pods:
            if config_hash and _config_hash(pod) != config_hash:
                continue
            if _runs(pod):
                return str(pod["metadata"]["name"])
        return None

    def logs(self, tail: int = 200, quiet: tuple[str, ...] = ("agent.pass_done",)) -> str:
        """The agent pod's last `tail` log lines, without those naming an event in quiet."""
        result = self.cluster.kubectl(
            "logs", "-n", NAMESPACE, "-l", SELECTOR, f"--tail={tail}", check=False
        )
        lines = (result.stdout + result.stderr).splitlines()
        return "\n".join(line for line in lines if not any(q in line for q in quiet))

    def restore(self) -> str:
        """The cluster's default agent again (no prewarm), after a test installed another."""
        return self.install()

    def ensure_running(self) -> str:
        """The running agent pod; the default one is installed again if none runs."""
        return self.running_pod() or self.restore()

    def restart(self, timeout: float = 120) -> str:
        """Delete the agent's pod; the name of the one the DaemonSet runs in its place."""
        old = self.running_pod()
        if old is not None:
            self.cluster.kubectl("delete", "pod", old, "-n", NAMESPACE, "--wait=false", check=False)

        def replaced() -> str | None:
            running = self.running_pod()
            return running if running not in (None, old) else None

        return wait_for(replaced, timeout=timeout, what=f"a new {DAEMONSET} pod")

    def uninstall(self) -> None:
        self.cluster.kubectl(
            "delete", "daemonset", DAEMONSET, "-n", NAMESPACE, "--ignore-not-found", "--wait=true",
            "--timeout=60s", check=False, timeout=90,
        )  # fmt: skip
        self.cluster.kubectl(
            "delete", "configmap", CONFIG_MAP, "-n", NAMESPACE, "--ignore-not-found", check=False
        )


AGENT_ADDON = "node-agent"


def start_node_agent(cp: ControlPlane) -> None:
    """Add-on: the node agent's DaemonSet on the local node, after the injector."""
    injector = cp.addons.get("injector")
    if not isinstance(injector, LocalInjector | PodInjector):
        raise RuntimeError("the node agent add-on needs the injector add-on before it")
    agent = LocalNodeAgent(cp, injector)
    cp.addons[AGENT_ADDON] = agent
    cp.log(f"node agent pod {agent.install()} runs")


def stop_node_agent(cp: ControlPlane) -> None:
    agent = cp.addons.get(AGENT_ADDON)
    if isinstance(agent, LocalNodeAgent):
        agent.uninstall()


def _config_hash(pod: dict[str, Any]) -> str | None:
    return (pod["metadata"].get("annotations") or {}).get(CONFIG_HASH)


def _runs(pod: dict[str, Any]) -> bool:
    """Every container of the pod runs, and it is not on its way out."""
    if pod["metadata"].get("deletionTimestamp"):
        return False
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return bool(statuses) and all("running" in (s.get("state") or {}) for s in statuses)
