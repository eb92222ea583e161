"""The injector as users install it: real pods on the local node, by Helm or kustomize.

`helm install` of charts/bento-juicefs, or `kubectl apply -k` of an overlay
over manifests/overlays/gke, onto the local control plane: the Deployment's
two replicas run on the real node from the locally built image, and the
apiserver calls them at the webhook Service's endpoints
(`--enable-aggregator-routing=true`: no kube-proxy on the host; the host
routes the pod CIDR to the node). What differs from a user's install is only
what this machine needs, set the way a user sets it:

- the node cache directory is the local node's (`cache.nodePath`, which also
  widens the sidecar-required policy's admitted paths);
- `cluster.kubernetesVersion` is the server's, and the repair periods are
  seconds (`local_settings`);
- the image is never pulled (`imagePullPolicy: Never`): it was imported into
  the node's containerd, and there is no registry;
- the node agent's DaemonSet is left out (the e2e suite decides when an agent
  runs, devcluster/installs/node_agent.py); its ServiceAccount, RBAC and fence are
  installed, as the chart installs them.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from devcluster.binaries import ensure_binaries
from devcluster.cluster import wait_for
from devcluster.control.plane import ControlPlane
from devcluster.installs.injector_install import (
    BASE,
    CREDENTIALS_SECRET,
    NAMESPACE,
    REPO,
    InjectorInstall,
    delete_patch,
    local_settings,
    merged,
    readyz_answers,
    served_certificate,
)
from devcluster.installs.injector_process import LocalInjector
from devcluster.node.host import node_cache_dir
from devcluster.storage.stack import StorageStack

CHART = REPO / "charts" / "bento-juicefs"
GKE_OVERLAY = REPO / "manifests" / "overlays" / "gke"
RELEASE = "bento-juicefs"
RELEASE_NAMESPACE = "default"
DEPLOYMENT = "bento-juicefs-injector"
SERVICE = DEPLOYMENT
SELECTOR = "app.kubernetes.io/name=bento-juicefs-injector"
CONFIG_MAP = "bento-juicefs-injector-config"
CA_SECRET = "bento-juicefs-injector-ca"
PORT = 9443
SERVER_NAME = f"{SERVICE}.{NAMESPACE}.svc"
INSTALL_METHODS = ("helm", "kustomize")
# How devcluster installs the injector: helm (the default), kustomize, or
# process (devcluster/installs/injector_process.py: a local process, the webhook at a URL).
INSTALL_ENV = "BENTO_INJECTOR_INSTALL"


def helm_values(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The values file for the local install: the chart's keys where it has one."""
    rest = {k: dict(v) for k, v in settings.items()}
    kubernetes_version = rest.pop("cluster")["kubernetesVersion"]
    node_path = rest["cache"].pop("nodePath")
    if not rest["cache"]:
        del rest["cache"]
    return {
        "kubernetesVersion": kubernetes_version,
        "cache": {"nodePath": node_path},
        "image": {"pullPolicy": "Never"},
        "nodeAgent": {"enabled": False},
        "config": rest,
    }


def shipped_config() -> dict[str, Any]:
    """The config.yaml of manifests/base's ConfigMap."""
    documents = yaml.safe_load_all((BASE / "config.yaml").read_text())
    config_map = next(d for d in documents if d and d["kind"] == "ConfigMap")
    parsed = yaml.safe_load(config_map["data"]["config.yaml"])
    assert isinstance(parsed, dict)
    return parsed


def kustomize_overlay(directory: Path, settings: Mapping[str, Any]) -> Path:
    """A kustomization over manifests/overlays/gke with the local settings."""
    directory.mkdir(parents=True, exist_ok=True)
    config = merged(shipped_config(), settings)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIG_MAP, "namespace": NAMESPACE},
        "data": {"config.yaml": yaml.safe_dump(config, sort_keys=False)},
    }
    pull_never = [
        {"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "Never"}
    ]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(GKE_OVERLAY, directory)],
        "patches": [
            {
                "target": {"kind": "ConfigMap", "name": CONFIG_MAP},
                "patch": yaml.safe_dump(config_map),
            },
            {"target": {"kind": "Deployment", "name": DEPLOYMENT}, "patch": json.dumps(pull_never)},
            delete_patch("DaemonSet", "bento-juicefs-node-agent"),
        ],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return directory


def node_agent_access() -> list[dict[str, Any]]:
    """The node agent's objects from manifests/base but its DaemonSet: what lets one run."""
    documents = yaml.safe_load_all((BASE / "node-agent.yaml").read_text())
    return [d for d in documents if d and d["kind"] != "DaemonSet"]


class PodInjector:
    """The injector's Deployment on the local node, installed by Helm or kustomize.

    start() and stop() scale the Deployment (to its replicas, to none);
    reconfigured() runs the replicas with a changed config for a while.
    """

    def __init__(self, cp: ControlPlane, method: str = "helm", replicas: int = 2) -> None:
        if method not in INSTALL_METHODS:
            raise ValueError(f"install method {method!r}: one of {', '.join(INSTALL_METHODS)}")
        self.cp = cp
        self.method = method
        self.replicas = replicas
        self.dir = cp.state_dir / "injector"
        self.config_file = self.dir / "config.yaml"
        node_dir = cp.node.dir if cp.node is not None else (cp.state_dir / "node").resolve()
        self.node_cache = node_cache_dir(node_dir)
        self.server_name = SERVER_NAME
        self.url = f"Service {NAMESPACE}/{SERVICE}"

    # -- install

    def install(self, credentials: dict[str, str] | None = None, timeout: float = 180) -> None:
        """Install, create the credentials Secret the platform team would, await the replicas."""
        self.dir.mkdir(parents=True, exist_ok=True)
        settings = local_settings(self.cp, self.node_cache)
        if self.method == "helm":
            self._helm_install(settings)
        else:
            overlay = kustomize_overlay(self.dir / "overlay", settings)
            self.cp.kubectl("apply", "-k", str(overlay), timeout=120)
        for document in node_agent_access():
            self.cp.apply(document)
        self.cp.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": CREDENTIALS_SECRET, "namespace": NAMESPACE},
                "stringData": credentials or {"metaurl": "redis://127.0.0.1:6379/1"},
            }
        )
        self.config_file.write_text(self._config_map_text())
        self.wait_ready(timeout)

    def _helm_install(self, settings: Mapping[str, Any]) -> None:
        values = self.dir / "values.yaml"
        values.write_text(yaml.safe_dump(helm_values(settings), sort_keys=False))
        helm = ensure_binaries(["helm"])["helm"]
        command = [
            str(helm), "upgrade", "--install", RELEASE, str(CHART),
            "--namespace", RELEASE_NAMESPACE, "--kubeconfig", str(self.cp.kubeconfig),
            "--values", str(values),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"helm install failed:\n{result.stdout}{result.stderr}")

    def _config_map_text(self) -> str:
        config_map = self.cp.get_json("configmap", CONFIG_MAP, "-n", NAMESPACE)
        return str(config_map["data"]["config.yaml"])

    def _set_config(self, text: str) -> None:
        patch = {"data": {"config.yaml": text}}
        self.cp.kubectl(
            "patch", "configmap", CONFIG_MAP, "-n", NAMESPACE, "--type=merge", "-p",
            json.dumps(patch),
        )  # fmt: skip

    # -- state

    def pods(self, terminating: bool = False) -> list[dict[str, Any]]:
        """The injector's pods; those on their way out only if `terminating`."""
        items = self.cp.get_json("pods", "-n", NAMESPACE, "-l", SELECTOR)["items"]
        return [p for p in items if terminating or not p["metadata"].get("deletionTimestamp")]

    def endpoints(self) -> list[str]:
        """host:port of each ready endpoint of the webhook Service (what the apiserver calls)."""
        slices = self.cp.get_json(
            "endpointslices", "-n", NAMESPACE, "-l", f"kubernetes.io/service-name={SERVICE}"
        )["items"]
        found: list[str] = []
        for item in slices:
            for endpoint in item.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready"):
                    found.extend(f"{address}:{PORT}" for address in endpoint["addresses"])
        return sorted(found)

    def ca_certificate(self) -> bytes:
        """The shared CA (PEM) the replicas' serving certificates come from."""
        secret = self.cp.get_json("secret", CA_SECRET, "-n", NAMESPACE)
        return base64.b64decode(secret["data"]["ca.crt"])

    def serving_certificates(self) -> list[bytes]:
        """The DER certificate each ready endpoint serves."""
        found = [served_certificate(a, self.server_name) for a in self.endpoints()]
        return [c for c in found if c is not None]

    def ready(self) -> bool:
        """Every replica is a ready endpoint and answers /readyz from here (whoever issued
        its certificate: with webhook.manageCaBundle off it is not the Secret's CA)."""
        endpoints = self.endpoints()
        return len(endpoints) >= self.replicas and all(readyz_answers(a) for a in endpoints)

    def wait_ready(self, timeout: float = 180) -> None:
        try:
            wait_for(self.ready, timeout=timeout, interval=1, what="the injector's replicas")
        except TimeoutError as err:
            raise TimeoutError(f"{err}\n{self.describe()}") from None

    def describe(self) -> str:
        """The pods and the last lines of their logs, for a failure message."""
        pods = self.cp.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide", check=False).stdout
        logs = self.cp.kubectl(
            "logs", "-n", NAMESPACE, "-l", SELECTOR, "--tail=30", "--prefix", check=False
        )
        return f"{pods}\n{logs.stdout}{logs.stderr}"

    def logs(self) -> str:
        result = self.cp.kubectl(
            "logs", "-n", NAMESPACE, "-l", SELECTOR, "--tail=-1", "--prefix", check=False
        )
        return result.stdout + result.stderr

    # -- lifecycle

    def _scale(self, replicas: int) -> None:
        self.cp.kubectl(
            "scale", "deployment", DEPLOYMENT, "-n", NAMESPACE, f"--replicas={replicas}"
        )

    def start(self, timeout: float = 120) -> None:
        self._scale(self.replicas)
        self.wait_ready(timeout)

    def stop(self) -> None:
        """Scale to none and wait until the pods are gone, not just terminating: a draining
        replica still serves, and still keeps the caBundle and the namespaces."""
        self._scale(0)
        wait_for(
            lambda: not self.pods(terminating=True),
            timeout=90,
            interval=0.5,
            what="the injector pods gone",
        )

    def wait_unreachable(self) -> None:
        wait_for(lambda: not self.endpoints(), timeout=60, what="no injector endpoint")

    def restart(self, timeout: float = 180) -> None:
        """A rollout (new pods read the config again), awaited."""
        self.cp.kubectl("rollout", "restart", "deployment", DEPLOYMENT, "-n", NAMESPACE)
        self.cp.kubectl(
            "rollout", "status", "deployment", DEPLOYMENT, "-n", NAMESPACE,
            f"--timeout={int(timeout)}s", timeout=timeout + 10,
        )  # fmt: skip
        self.wait_ready(timeout)

    @contextmanager
    def reconfigured(self, changes: Mapping[str, Any]) -> Iterator[None]:
        """The replicas running with changes merged into their config; as before after."""
        original = self._config_map_text()
        running = bool(self.pods())
        self._set_config(yaml.safe_dump(merged(yaml.safe_load(original), changes)))
        try:
            if running:
                self.restart()
            else:
                self.start()
            yield
        finally:
            self._set_config(original)
            if running:
                self.restart()
            else:
                self.stop()


def install_method() -> str:
    method = os.environ.get(INSTALL_ENV) or "helm"
    accepted = (*INSTALL_METHODS, "process")
    if method not in accepted:
        raise ValueError(f"{INSTALL_ENV}={method!r}: one of {', '.join(accepted)}")
    return method


def start_injector(cp: ControlPlane) -> None:
    """The injector installed on the local cluster the way $BENTO_INJECTOR_INSTALL says."""
    method = install_method()
    injector: InjectorInstall = (
        LocalInjector(cp) if method == "process" else PodInjector(cp, method)
    )
    storage = cp.addons.get("storage")
    # The tenants' read-only credentials (docs/tenants.md): what the namespace
    # controller copies into every opted-in namespace and the node agent mounts.
    # The publisher's stay on the host, with the storage stack's writer mount.
    injector.install(storage.credentials() if isinstance(storage, StorageStack) else None)
    if isinstance(injector, LocalInjector):
        injector.start()
    cp.addons["injector"] = injector
    cp.log(f"injector ready ({method}) at {injector.url}")


def stop_injector(cp: ControlPlane) -> None:
    injector = cp.addons.get("injector")
    if isinstance(injector, LocalInjector):
        injector.stop()
