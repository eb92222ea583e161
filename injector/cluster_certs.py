"""Certificates in a cluster: a CA shared by replicas through a Secret, the caBundle
kept in the MutatingWebhookConfiguration, and a serving cert per replica.

Replicas race to create the CA Secret; the loser reads the winner's. Each
replica issues its own serving certificate from that CA, so rotating one
never touches the caBundle or the other replicas.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, cast

import structlog
from kubernetes_asyncio import client

from injector.certs import CertFiles, generate_ca, issue_serving_cert, service_hosts, write_atomic
from injector.config import InjectorConfig
from injector.kube import FIELD_MANAGER, TIMEOUT, is_status

log = structlog.get_logger("injector.cluster_certs")

CA_CERT_KEY = "ca.crt"
CA_KEY_KEY = "ca.key"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def ensure_shared_ca(api: Any, config: InjectorConfig) -> tuple[bytes, bytes]:
    core = client.CoreV1Api(api)
    namespace, name = config.webhook.namespace, config.webhook.ca_secret_name
    for _ in range(3):
        try:
            secret = await core.read_namespaced_secret(name, namespace, **TIMEOUT)
            data = secret.data or {}
            if CA_CERT_KEY in data and CA_KEY_KEY in data:
                return base64.b64decode(data[CA_CERT_KEY]), base64.b64decode(data[CA_KEY_KEY])
            raise RuntimeError(f"Secret {namespace}/{name} lacks {CA_CERT_KEY} or {CA_KEY_KEY}")
        except client.exceptions.ApiException as err:
            if err.status != 404:
                raise
        ca_pem, ca_key_pem = generate_ca()
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/managed-by": config.controller.managed_by},
            },
            "type": "Opaque",
            "data": {CA_CERT_KEY: _b64(ca_pem), CA_KEY_KEY: _b64(ca_key_pem)},
        }
        try:
            await core.create_namespaced_secret(
                namespace, cast(Any, body), field_manager=FIELD_MANAGER, **TIMEOUT
            )
            log.info("ca.created", secret=f"{namespace}/{name}")
            return ca_pem, ca_key_pem
        except client.exceptions.ApiException as err:
            if not is_status(err, 409):  # another replica won the race: read theirs
                raise
    raise RuntimeError(f"could not create or read Secret {namespace}/{name}")


def write_serving_files(
    config: InjectorConfig, ca_pem: bytes, ca_key_pem: bytes, extra_hosts: list[str]
) -> CertFiles:
    cert_dir = Path(config.server.cert_dir)
    files = CertFiles(
        cert_dir / config.server.cert_file,
        cert_dir / config.server.key_file,
        cert_dir / config.server.ca_file,
    )
    hosts = service_hosts(config.webhook.service_name, config.webhook.namespace, extra_hosts)
    cert_pem, key_pem = issue_serving_cert(ca_pem, ca_key_pem, hosts)
    write_atomic(cert_dir / "ca.key", ca_key_pem)
    write_atomic(files.ca, ca_pem, 0o644)
    write_atomic(files.key, key_pem)
    write_atomic(files.cert, cert_pem, 0o644)
    return files


async def patch_ca_bundle(api: Any, config: InjectorConfig, ca_pem: bytes) -> bool:
    """Make every webhook of our configuration trust ca_pem. True if it patched."""
    admission = client.AdmissionregistrationV1Api(api)
    name = config.webhook.configuration_name
    current = await admission.read_mutating_webhook_configuration(name, **TIMEOUT)
    wanted = _b64(ca_pem)
    ops = [
        {"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": wanted}
        for index, hook in enumerate(current.webhooks or [])
        if hook.client_config.ca_bundle != wanted
    ]
    if not ops:
        return False
    # The resourceVersion test makes a concurrent edit fail instead of being lost.
    ops.insert(
        0,
        {
            "op": "test",
            "path": "/metadata/resourceVersion",
            "value": current.metadata.resource_version,
        },
    )
    await admission.patch_mutating_webhook_configuration(name, ops, **TIMEOUT)
    log.info("ca_bundle.patched", configuration=name, webhooks=len(ops) - 1)
    return True


async def ca_bundle_problem(api: Any, config: InjectorConfig, ca_pem: bytes) -> str | None:
    """None when every webhook trusts our CA; otherwise what is wrong (for /readyz)."""
    admission = client.AdmissionregistrationV1Api(api)
    name = config.webhook.configuration_name
    try:
        current = await admission.read_mutating_webhook_configuration(name, **TIMEOUT)
    except client.exceptions.ApiException as err:
        return f"cannot read MutatingWebhookConfiguration {name}: {err.status} {err.reason}"
    wanted = _b64(ca_pem)
    stale = [h.name for h in current.webhooks or [] if h.client_config.ca_bundle != wanted]
    if stale:
        return f"caBundle of {', '.join(stale)} in {name} is not our CA yet"
    return None
