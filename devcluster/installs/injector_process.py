"""The injector on the local control plane as a local process (BENTO_INJECTOR_INSTALL=process).

By default devcluster installs the injector as real pods with Helm or
kustomize (devcluster/installs/injector_pods.py). This module keeps the other way,
for debugging the injector with a local process: the manifests from
`manifests/base` are applied as users apply them, with two changes made by a
generated kustomize overlay: the webhook's `clientConfig` points at
`https://127.0.0.1:PORT/mutate` instead of the Service, and the Deployment
(which could never run here) is left out. The injector then runs as a local
process with a kubeconfig for its own ServiceAccount (so its RBAC is what is
tested), generates its CA into the shared Secret and patches the caBundle
itself: the same code path as in a cluster.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

import yaml

from common.ports import free_port
from common.processes import log_tail, spawn_group, stop_group
from devcluster.cluster import Cluster, wait_for
from devcluster.control.plane import ControlPlane
from devcluster.node.host import node_cache_dir

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "manifests" / "base"
NAMESPACE = "bento-juicefs-system"
SERVICE_ACCOUNT = "bento-juicefs-injector"
CREDENTIALS_SECRET = "juicefs-models-credentials"


def delete_patch(kind: str, name: str) -> dict[str, Any]:
    """A kustomize patch leaving out one apps/v1 object of the injector's namespace."""
    document = {
        "$patch": "delete",
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": NAMESPACE},
    }
    return {"target": {"kind": kind, "name": name}, "patch": yaml.safe_dump(document)}


def local_overlay(directory: Path, url: str) -> Path:
    """A kustomization over manifests/base with the endpoint swapped."""
    directory.mkdir(parents=True, exist_ok=True)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(BASE, directory)],
        "patches": [
            {
                "target": {
                    "kind": "MutatingWebhookConfiguration",
                    "name": "bento-juicefs-injector",
                },
                "patch": json.dumps(
                    [
                        {"op": "remove", "path": "/webhooks/0/clientConfig/service"},
                        {"op": "add", "path": "/webhooks/0/clientConfig/url", "value": url},
                    ]
                ),
            },
            delete_patch("Deployment", "bento-juicefs-injector"),
            # The tests decide when a node agent runs (devcluster/installs/node_agent.py).
            delete_patch("DaemonSet", "bento-juicefs-node-agent"),
        ],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return directory


def local_settings(cluster: Cluster, node_cache: Path) -> dict[str, Any]:
    """What the local cluster's injector config sets over the shipped one, however installed."""
    return {
        "cluster": {"kubernetesVersion": server_minor(cluster)},
        # The node's local SSD is a directory of its own state (removed with
        # the node), never the profile's real path on this machine.
        "cache": {"nodePath": str(node_cache)},
        # Shorter periods than the defaults, so tests see a repair within seconds.
        "server": {"certCheckIntervalSeconds": 2},
        "webhook": {"caBundleCheckSeconds": 2},
        "controller": {"resyncSeconds": 10},
    }


def server_minor(cluster: Cluster) -> str:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    return f"{version['major']}.{version['minor'].rstrip('+')}"


def token_kubeconfig(cluster: Cluster, path: Path, server: str, ca_file: Path) -> Path:
    """A kubeconfig for the injector's ServiceAccount (TokenRequest, like a kubelet would)."""
    token = cluster.kubectl(
        "create", "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--duration=24h"
    ).stdout.strip()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "local", "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": SERVICE_ACCOUNT, "user": {"token": token}}],
        "contexts": [
            {"name": "injector", "context": {"cluster": "local", "user": SERVICE_ACCOUNT}}
        ],
        "current-context": "injector",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


class InjectorInstall(Protocol):
    """The local cluster's injector, however installed: what the e2e tests use of it."""

    config_file: Path  # the config the replicas run with (a copy, for `injector check`)
    node_cache: Path
    server_name: str  # the name the webhook's caBundle verifies the serving certificate for
    url: str  # where the webhook's clientConfig points, for messages

    def install(self, credentials: dict[str, str] | None = None) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def ready(self) -> bool: ...
    def wait_unreachable(self) -> None: ...
    def endpoints(self) -> list[str]: ...
    def ca_certificate(self) -> bytes: ...
    def serving_certificates(self) -> list[bytes]: ...
    def logs(self) -> str: ...
    def reconfigured(self, changes: Mapping[str, Any]) -> AbstractContextManager[None]: ...


def merged(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """base with changes merged in, mappings key by key, anything else replaced."""
    result = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def served_certificate(address: str, server_name: str, timeout: float = 3) -> bytes | None:
    """The DER certificate served at host:port, unverified (the caller judges it)."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            return tls.getpeercert(binary_form=True)
    except OSError:
        return None


def readyz_answers(address: str, ca: Path | None = None) -> bool:
    """GET https://address/readyz answers 200; verified against ca if given, else
    like the kubelet's probe, whoever issued the certificate."""
    context = ssl.create_default_context(cafile=None if ca is None else str(ca))
    if ca is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(
            f"https://{address}/readyz", context=context, timeout=2
        ) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class LocalInjector:
    """`python -m injector serve` for the local control plane; start() and stop() repeatable."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.dir = cp.state_dir / "injector"
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}/mutate"
        self.log_file = cp.log_path("injector")
        self.process: subprocess.Popen[bytes] | None = None
        self.config_file = self.dir / "config.yaml"
        self.kubeconfig = self.dir / "injector.kubeconfig"
        node_dir = cp.node.dir if cp.node is not None else (cp.state_dir / "node").resolve()
        self.node_cache = node_cache_dir(node_dir)
        self.server_name = "127.0.0.1"

    def install(self, credentials: dict[str, str] | None = None) -> None:
        """Apply the manifests and the credentials Secret the platform team would create."""
        overlay = local_overlay(self.dir / "overlay", self.url)
        self.cp.kubectl("apply", "-k", str(overlay))
        self.cp.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": CREDENTIALS_SECRET, "namespace": NAMESPACE},
                "stringData": credentials or {"metaurl": "redis://127.0.0.1:6379/1"},
            }
        )
        config = local_settings(self.cp, self.node_cache)
        config["server"] = {
            **config["server"],
            "host": "127.0.0.1",
            "port": self.port,
            "certDir": str(self.dir / "certs"),
            "shutdownDelaySeconds": 0.2,
        }
        self.config_file.write_text(yaml.safe_dump(config))
        token_kubeconfig(self.cp, self.kubeconfig, self.cp.server, self.cp.pki.ca.cert)

    def start(self, timeout: float = 60) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self.process = spawn_group(
            [
                sys.executable,
                "-m",
                "injector",
                "serve",
                "--config",
                str(self.config_file),
                "--kubeconfig",
                str(self.kubeconfig),
            ],
            self.log_file,
            cwd=REPO,
        )
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"injector did not become ready (exit code {self.process.poll()}):\n"
                    f"{log_tail(self.log_file)}"
                )
            time.sleep(0.25)

    def ready(self) -> bool:
        ca = self.dir / "certs" / "ca.crt"
        return ca.exists() and readyz_answers(f"127.0.0.1:{self.port}", ca)

    def stop(self) -> None:
        """SIGTERM (the injector drains its requests), SIGKILL after 15 s."""
        if self.process is not None:
            stop_group(self.process, 15)

    def wait_unreachable(self) -> None:
        wait_for(lambda: not self.ready(), timeout=15, what="injector to stop answering")

    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{self.port}"] if self.ready() else []

    def ca_certificate(self) -> bytes:
        return (self.dir / "certs" / "ca.crt").read_bytes()

    def serving_certificates(self) -> list[bytes]:
        found = served_certificate(f"127.0.0.1:{self.port}", self.server_name)
        return [found] if found is not None else []

    def logs(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    @contextmanager
    def reconfigured(self, changes: Mapping[str, Any]) -> Iterator[None]:
        """A second process at the same address with changes merged into the config, while
        the usual one is stopped; the usual one as it was after."""
        running = self.process is not None and self.process.poll() is None
        self.stop()
        config = self.dir / "reconfigured.yaml"
        config.write_text(
            yaml.safe_dump(merged(yaml.safe_load(self.config_file.read_text()), changes))
        )
        log = self.dir / "reconfigured.log"
        command = [sys.executable, "-m", "injector", "serve", "--config", str(config),
                   "--kubeconfig", str(self.kubeconfig)]  # fmt: skip
        process = spawn_group(command, log, cwd=REPO)
        try:
            wait_for(self.ready, timeout=60, what=f"the reconfigured injector ({log})")
            yield
        finally:
            stop_group(process, 15)
            if running:
                self.start()
