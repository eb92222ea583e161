"""Certificates and kubeconfigs for the local control plane.

One cluster CA signs the kube-apiserver serving certificate, the client
certificates of the admin, kube-controller-manager, kube-scheduler,
kube-proxy and the apiserver's kubelet client, and each node's kubelet
client (`system:node:NAME` in `system:nodes`) and serving certificates
(identity is the certificate's CN and O, as in kubeadm). The service-account
key pair is a separate RSA key. Files are written atomically.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from injector.pki.authority import generate_ca, issue_cert
from injector.pki.cert_files import write_atomic

CERT_LIFETIME = dt.timedelta(days=365)

APISERVER_HOSTS: tuple[str, ...] = (
    "127.0.0.1",
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "10.0.0.1",
)

ADMIN = ("kubernetes-admin", ("system:masters",))
CONTROLLER_MANAGER = ("system:kube-controller-manager", ())
SCHEDULER = ("system:kube-scheduler", ())
# Bound by the default ClusterRoleBinding system:node-proxier.
KUBE_PROXY = ("system:kube-proxy", ())
# The apiserver's identity towards kubelets (logs, exec); bound to
# system:kubelet-api-admin by the control plane once it is up.
APISERVER_KUBELET_CLIENT = ("kube-apiserver-kubelet-client", ())


def generate_sa_keypair() -> tuple[bytes, bytes]:
    """The service-account signing key pair: (private PEM, public PEM), RSA 2048."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ClusterPKI:
    """Paths of every file `create` writes under one directory."""

    dir: Path

    @property
    def ca(self) -> KeyPair:
        return KeyPair(self.dir / "ca.crt", self.dir / "ca.key")

    @property
    def apiserver(self) -> KeyPair:
        return KeyPair(self.dir / "apiserver.crt", self.dir / "apiserver.key")

    @property
    def admin(self) -> KeyPair:
        return KeyPair(self.dir / "admin.crt", self.dir / "admin.key")

    @property
    def controller_manager(self) -> KeyPair:
        return KeyPair(self.dir / "controller-manager.crt", self.dir / "controller-manager.key")

    @property
    def scheduler(self) -> KeyPair:
        return KeyPair(self.dir / "scheduler.crt", self.dir / "scheduler.key")

    @property
    def kube_proxy(self) -> KeyPair:
        return KeyPair(self.dir / "kube-proxy.crt", self.dir / "kube-proxy.key")

    @property
    def apiserver_kubelet_client(self) -> KeyPair:
        return KeyPair(
            self.dir / "apiserver-kubelet-client.crt", self.dir / "apiserver-kubelet-client.key"
        )

    def kubelet_client(self, node: str) -> KeyPair:
        return KeyPair(self.dir / f"kubelet-{node}.crt", self.dir / f"kubelet-{node}.key")

    def kubelet_serving(self, node: str) -> KeyPair:
        return KeyPair(
            self.dir / f"kubelet-{node}-serving.crt", self.dir / f"kubelet-{node}-serving.key"
        )

    def issue_node(self, node: str, node_ip: str) -> tuple[KeyPair, KeyPair]:
        """A node's kubelet certificates: (client as system:node:NAME, serving for its IP).

        The client identity is what the Node authorizer and NodeRestriction check.
        """
        ca_pem, ca_key_pem = self.ca.cert.read_bytes(), self.ca.key.read_bytes()
        client = issue_cert(
            ca_pem, ca_key_pem, f"system:node:{node}", organizations=("system:nodes",), client=True
        )
        serving = issue_cert(ca_pem, ca_key_pem, node, hosts=(node, node_ip), server=True)
        _write_pair(self.kubelet_client(node), *client)
        _write_pair(self.kubelet_serving(node), *serving)
        return self.kubelet_client(node), self.kubelet_serving(node)

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    @classmethod
    def create(cls, directory: Path, hosts: Sequence[str] = APISERVER_HOSTS) -> ClusterPKI:
        """Write a fresh CA, the apiserver/client certificates and the SA key pair."""
        pki = cls(directory)
        ca_pem, ca_key_pem = generate_ca("bento-juicefs-devcluster-ca")
        _write_pair(pki.ca, ca_pem, ca_key_pem)
        serving = issue_cert(ca_pem, ca_key_pem, "kube-apiserver", hosts=hosts, server=True)
        _write_pair(pki.apiserver, *serving)
        for pair, (cn, orgs) in (
            (pki.admin, ADMIN),
            (pki.controller_manager, CONTROLLER_MANAGER),
            (pki.scheduler, SCHEDULER),
            (pki.kube_proxy, KUBE_PROXY),
            (pki.apiserver_kubelet_client, APISERVER_KUBELET_CLIENT),
        ):
            _write_pair(pair, *issue_cert(ca_pem, ca_key_pem, cn, organizations=orgs, client=True))
        sa_private, sa_public = generate_sa_keypair()
        write_atomic(pki.sa_key, sa_private)
        write_atomic(pki.sa_pub, sa_public, 0o644)
        return pki


def _write_pair(pair: KeyPair, cert_pem: bytes, key_pem: bytes) -> None:
    write_atomic(pair.key, key_pem)
    write_atomic(pair.cert, cert_pem, 0o644)


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca_cert: Path,
    client: KeyPair,
    user: str,
    cluster: str = "devcluster",
) -> Path:
    """A kubeconfig with the CA and the client cert/key embedded as base64 data."""

    def b64(file: Path) -> str:
        return base64.b64encode(file.read_bytes()).decode("ascii")

    context = f"{user}@{cluster}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {"server": server, "certificate-authority-data": b64(ca_cert)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(client.cert),
                    "client-key-data": b64(client.key),
                },
            }
        ],
        "contexts": [{"name": context, "context": {"cluster": cluster, "user": user}}],
        "current-context": context,
        "preferences": {},
    }
    write_atomic(path, yaml.safe_dump(config, sort_keys=False).encode())
    return path
