"""Certificates in a cluster: a CA shared by replicas through a Secret, the caBundle
kept in the MutatingWebhookConfiguration, and a serving cert per replica.

Replicas race to create the CA Secret; the loser reads the winner's. Each
replica issues its own serving certificate from that CA, so rotating one
never touches the caBundle or the other replicas.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import structlog
from aiohttp import web
from kubernetes_asyncio import client

from injector.certs import CertFiles, generate_ca, issue_serving_cert, service_hosts, write_atomic
from injector.config import InjectorConfig
from injector.kube import FIELD_MANAGER, KUBE_API, TIMEOUT, is_status
from injector.lifecycle import READY_CHECKS, CleanupContext, background

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


class CaBundleKeeper:
    """Keeps our CA in the webhook configuration's caBundle; /readyz reads its verdict.

    A chart upgrade or a GitOps sync may reset the caBundle; re-patching on a
    timer heals that without a restart, and readiness reflects it meanwhile.
    """

    def __init__(self, api: Any, config: InjectorConfig, ca_pem: bytes) -> None:
        self._api, self._config, self._ca_pem = api, config, ca_pem
        self.problem: str | None = "caBundle not checked yet"
        self._checked = time.monotonic()

    async def check_once(self) -> None:
        try:
            await patch_ca_bundle(self._api, self._config, self._ca_pem)
            self.problem = await ca_bundle_problem(self._api, self._config, self._ca_pem)
            self._checked = time.monotonic()
        except Exception as err:
            log.warning("ca_bundle.check_failed", error=str(err))

    async def run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._config.webhook.ca_bundle_check_seconds)

    async def ready_check(self) -> str | None:
        # A verdict nobody could refresh for several periods is no verdict.
        stale_after = 5 * self._config.webhook.ca_bundle_check_seconds
        if time.monotonic() - self._checked > stale_after:
            return f"caBundle not checked for {stale_after:.0f}s (apiserver unreachable?)"
        return self.problem


CA_BUNDLE_KEEPER = web.AppKey("ca_bundle_keeper", CaBundleKeeper)


def shared_ca(config: InjectorConfig, extra_hosts: list[str] | None = None) -> CleanupContext:
    """At startup: the replicas' shared CA, this replica's serving files, the caBundle.

    Runs before the serving certificate is loaded (the files it writes are
    the ones served); then keeps the caBundle patched until cleanup, and
    makes /readyz depend on it.
    """

    async def context(app: web.Application) -> AsyncIterator[None]:
        api = app[KUBE_API]
        ca_pem, ca_key_pem = await ensure_shared_ca(api, config)
        write_serving_files(
            config, ca_pem, ca_key_pem, ["localhost", "127.0.0.1", *(extra_hosts or [])]
        )
        keeper = CaBundleKeeper(api, config, ca_pem)
        await keeper.check_once()
        app[CA_BUNDLE_KEEPER] = keeper
        app[READY_CHECKS].append(keeper.ready_check)
        async with background(keeper.run()):
            yield

    return context
