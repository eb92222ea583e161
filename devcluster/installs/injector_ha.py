"""Several injector replicas on the local control plane, behind the real Service.

The webhook configuration is manifests/base's as is, `clientConfig.service`
included: the apiserver (`--enable-aggregator-routing=true`) resolves the
Service itself to a random ready endpoint of the Service's EndpointSlices,
for every review (1.37's WebhookRoundTripLoadBalancing, on by default) or,
with that gate off as before 1.37, when it dials a new connection that it
then keeps. Each replica is a local process
(`python -m injector serve` with the ServiceAccount's token, its own port on
the address the apiserver listens on, its own certificate directory) listed
in an EndpointSlice of its own (`kubernetes.io/service-name`), and this
module plays the parts of Kubernetes that a Deployment would have had:

- the kubelet's readiness probe: a thread GETs each replica's /readyz every
  `probe_period` and, as the EndpointSlice controller would, flips that
  endpoint's `ready` condition when the answer changes;
- a pod deletion: `delete()` marks the endpoint terminating (not ready) and
  sends SIGTERM at the same moment, as the EndpointSlice controller and the
  kubelet each react to the deletion on their own.

Why not the Deployment on the real node: the behaviour under test is the
injector's (shared CA, caBundle, draining) and the apiserver's (resolving the
Service, calling the webhook); processes can be SIGTERMed or SIGKILLed at a
chosen moment and their logs read directly, a change to the injector needs
no image rebuild, and no node is needed at all. What is emulated is the
probe and the endpoint flip; Kubernetes flips the endpoint on deletion as
soon as the EndpointSlice controller sees it, which `delete()` does, and
`signal()` alone leaves it to the (slower) readiness probe: the harder case.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.ports import free_port
from common.processes import log_tail, spawn_group, stop_group
from devcluster.control.api import Api
from devcluster.control.plane import ControlPlane
from devcluster.installs.injector_install import (
    BASE,
    CREDENTIALS_SECRET,
    NAMESPACE,
    SERVICE,
    server_minor,
    token_kubeconfig,
)
from devcluster.installs.injector_replica import Replica

WEBHOOK_CONFIGURATION = "bento-juicefs-injector"
CA_SECRET = "bento-juicefs-injector-ca"
MANAGED_BY = "devcluster.bento-juicefs.injector-ha"


def ha_overlay(directory: Path) -> Path:
    """manifests/base as users apply it, less what cannot run here (Deployment, DaemonSet)."""
    directory.mkdir(parents=True, exist_ok=True)
    deletions = [
        ("apps/v1", "Deployment", "bento-juicefs-injector"),
        ("apps/v1", "DaemonSet", "bento-juicefs-node-agent"),
    ]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(BASE, directory)],
        "patches": [
            {
                "target": {"kind": kind, "name": name},
                "patch": yaml.safe_dump(
                    {
                        "$patch": "delete",
                        "apiVersion": api_version,
                        "kind": kind,
                        "metadata": {"name": name, "namespace": NAMESPACE},
                    }
                ),
            }
            for api_version, kind, name in deletions
        ],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return directory


@dataclass
class HaInjectors:
    """N injector replicas behind the Service's EndpointSlices; `install()`, `start()`, ..."""

    cp: ControlPlane
    replicas: int = 2
    probe_period: float = 0.5
    check_seconds: float = 1.0
    cert_check_seconds: float = 1.0
    shutdown_delay: float = 3.0
    members: list[Replica] = field(default_factory=list)
    transitions: list[tuple[float, str, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir = self.cp.state_dir / "injector-ha"
        self.kubeconfig = self.dir / "injector.kubeconfig"
        self.api = Api(self.cp)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None
        self.members = [
            Replica(
                index,
                self.cp.host,
                free_port(self.cp.host),
                self.dir / f"replica-{index}",
                self.cp.log_path(f"injector-{index}"),
            )
            for index in range(self.replicas)
        ]

    # -- set up ---------------------------------------------------------------

    def install(self, credentials: dict[str, str] | None = None) -> None:
        if self.cp.host.startswith("127."):
            raise RuntimeError(
                "EndpointSlices refuse loopback addresses: the control plane needs a "
                "NodeNetwork (its apiserver then listens on the veth's host end)"
            )
        self.cp.kubectl("apply", "-k", str(ha_overlay(self.dir / "overlay")))
        self.cp.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": CREDENTIALS_SECRET, "namespace": NAMESPACE},
                "stringData": credentials or {"metaurl": "redis://127.0.0.1:6379/1"},
            }
        )
        token_kubeconfig(self.cp, self.kubeconfig, self.cp.server, self.cp.pki.ca.cert)
        minor = server_minor(self.cp)
        for replica in self.members:
            replica.dir.mkdir(parents=True, exist_ok=True)
            config = {
                "cluster": {"kubernetesVersion": minor},
                "server": {
                    "host": replica.host,
                    "port": replica.port,
                    "certDir": str(replica.cert_dir),
                    "certCheckIntervalSeconds": self.cert_check_seconds,
                    "shutdownDelaySeconds": self.shutdown_delay,
                },
                "webhook": {"caBundleCheckSeconds": self.check_seconds},
                "controller": {"resyncSeconds": 10},
            }
            replica.config_file.write_text(yaml.safe_dump(config))
            self._write_endpoint(replica, ready=False, serving=False, terminating=False)
        self._prober = threading.Thread(target=self._probe_loop, name="ha-prober", daemon=True)
        self._prober.start()

    def _write_endpoint(
        self, replica: Replica, *, ready: bool, serving: bool, terminating: bool
    ) -> None:
        state = (ready, serving, terminating)
        body = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": replica.slice_name,
                "namespace": NAMESPACE,
                "labels": {
                    "kubernetes.io/service-name": SERVICE,
                    "endpointslice.kubernetes.io/managed-by": MANAGED_BY,
                },
            },
            "addressType": "IPv4",
            "ports": [{"name": "https", "port": replica.port, "protocol": "TCP"}],
            "endpoints": [
                {
                    "addresses": [replica.host],
                    "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                    "targetRef": {"kind": "Pod", "name": replica.name, "namespace": NAMESPACE},
                }
            ],
        }
        self.api.apply(
            f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices/{replica.slice_name}",
            body,
        )
        with self._lock:
            replica.endpoint = state
            self.transitions.append((time.monotonic(), replica.name, ready))

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.probe_period):
            for replica in self.members:
                answered = replica.ready()
                ready = answered and not replica.terminating
                serving = answered
                state = (ready, serving, replica.terminating)
                if state != replica.endpoint:
                    # On failure the next probe tries again.
                    with contextlib.suppress(urllib.error.URLError, OSError):
                        self._write_endpoint(
                            replica, ready=ready, serving=serving, terminating=replica.terminating
                        )

    # -- replicas --------------------------------------------------------------

    def spawn(self, replica: Replica) -> None:
        if replica.running():
            return
        replica.terminating = False
        replica.log_offset = replica.log_file.stat().st_size if replica.log_file.exists() else 0
        replica.process = spawn_group(
            [
                sys.executable,
                "-m",
                "injector",
                "serve",
                "--config",
                str(replica.config_file),
                "--kubeconfig",
                str(self.kubeconfig),
                "--extra-host",
                replica.host,
            ],
            replica.log_file,
            # As in the image (Dockerfile): every log line reaches the file at once.
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=Path(__file__).resolve().parents[2],
        )

    def wait_listed(self, replica: Replica, timeout: float = 60) -> None:
        """Until the replica answers /readyz and its endpoint is listed ready."""
        deadline = time.monotonic() + timeout
        while not (replica.endpoint or (False,))[0]:
            if not replica.running() or time.monotonic() > deadline:
                code = replica.process.poll() if replica.process else None
                raise RuntimeError(
                    f"{replica.name} did not become ready (exit code {code}):\n"
                    f"{log_tail(replica.log_file)}"
                )
            time.sleep(0.1)

    def start(self, *indices: int) -> None:
        """Start the replicas (all by default) at once, then wait until all are listed ready."""
        chosen = [self.members[i] for i in indices] if indices else self.members
        for replica in chosen:
            self.spawn(replica)
        for replica in chosen:
            self.wait_listed(replica)

    def signal(self, index: int, sig: signal.Signals = signal.SIGTERM) -> None:
        """Send a signal only; the readiness probe finds out the rest."""
        process = self.members[index].process
        if process is not None and process.poll() is None:
            process.send_signal(sig)

    def delete(self, index: int) -> None:
        """As a pod deletion: endpoint terminating (not ready) and SIGTERM, together."""
        replica = self.members[index]
        replica.terminating = True
        sender = threading.Thread(target=self.signal, args=(index,))
        sender.start()
        self._write_endpoint(replica, ready=False, serving=True, terminating=True)
        sender.join()

    def wait_exit(self, index: int, timeout: float = 60) -> int:
        process = self.members[index].process
        assert process is not None
        return process.wait(timeout)

    def wait_unlisted(self, index: int, timeout: float = 30) -> None:
        replica = self.members[index]
        deadline = time.monotonic() + timeout
        while (replica.endpoint or (False,))[0]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{replica.name} still listed ready after {timeout:.0f}s")
            time.sleep(0.05)

    def stop_all(self) -> None:
        for replica in self.members:
            if replica.process is not None:
                stop_group(replica.process, 15)

    def uninstall(self) -> None:
        """Stop the prober and the replicas; remove the EndpointSlices."""
        self._stop.set()
        if self._prober is not None:
            self._prober.join(10)
        self.stop_all()
        for replica in self.members:
            self.cp.kubectl(
                "delete", "endpointslice", replica.slice_name, "-n", NAMESPACE,
                "--ignore-not-found", check=False,
            )  # fmt: skip

    # -- what the cluster holds ---------------------------------------------------

    def secret_data(self) -> dict[str, bytes] | None:
        found = self.cp.kubectl(
            "get", "secret", CA_SECRET, "-n", NAMESPACE, "-o", "json", check=False
        )
        if found.returncode != 0:
            return None
        data = json.loads(found.stdout).get("data") or {}
        return {key: base64.b64decode(value) for key, value in data.items()}

    def webhook_configuration(self) -> dict[str, Any]:
        result: dict[str, Any] = self.cp.get_json(
            "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION
        )
        return result

    def ca_bundles(self) -> list[bytes]:
        hooks = self.webhook_configuration().get("webhooks") or []
        return [base64.b64decode(h.get("clientConfig", {}).get("caBundle", "")) for h in hooks]

    def served_certificate(self, index: int) -> bytes:
        """The DER certificate a replica presents now (a new connection, SNI as the apiserver)."""
        replica = self.members[index]
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with (
            socket.create_connection((replica.host, replica.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=f"{SERVICE}.{NAMESPACE}.svc") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der
