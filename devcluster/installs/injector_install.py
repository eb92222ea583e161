"""What every local install of the injector shares: the manifests, the settings, checks.

The pods installed by Helm or kustomize (`injector_pods`), the local process
(`injector_process`) and the replicas behind the Service (`injector_ha`) all
apply `manifests/base` (or the chart) into NAMESPACE, run with the settings
of `local_settings` over the shipped config, and are judged by the same
checks (`readyz_answers`, `served_certificate`). `InjectorInstall` is what
the e2e tests use of whichever is installed.
"""

from __future__ import annotations

import copy
import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import yaml

from devcluster.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "manifests" / "base"
NAMESPACE = "bento-juicefs-system"
SERVICE_ACCOUNT = "bento-juicefs-injector"
SERVICE = "bento-juicefs-injector"  # the webhook's Service in manifests/base
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
