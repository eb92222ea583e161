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

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from common.ports import free_port
from common.processes import log_tail, spawn_group, stop_group
from devcluster.cluster import wait_for
from devcluster.control.plane import ControlPlane
from devcluster.installs.injector_install import (
    BASE,
    CREDENTIALS_SECRET,
    NAMESPACE,
    REPO,
    delete_patch,
    local_settings,
    merged,
    readyz_answers,
    served_certificate,
    token_kubeconfig,
)
from devcluster.node.host import node_cache_dir


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
