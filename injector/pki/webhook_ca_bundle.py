"""The caBundle of the MutatingWebhookConfiguration through the API: read, and patch.

The patch tests the resourceVersion read, so a replica with a stale view
loses (`Conflict`) instead of undoing a newer patch.
"""

from __future__ import annotations

import base64
from typing import Any

from kubernetes_asyncio import client

from injector.config import InjectorConfig
from injector.kube import TIMEOUT, is_status
from injector.pki.shared_ca import Conflict, WebhookBundles


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class KubeWebhookStore:
    def __init__(self, api: Any, config: InjectorConfig) -> None:
        self._admission = client.AdmissionregistrationV1Api(api)
        self.name = config.webhook.configuration_name

    async def read(self) -> WebhookBundles:
        current = await self._admission.read_mutating_webhook_configuration(self.name, **TIMEOUT)
        bundles = []
        for hook in current.webhooks or []:
            encoded = hook.client_config.ca_bundle or ""
            try:
                bundles.append(base64.b64decode(encoded))
            except ValueError:
                bundles.append(b"")
        return WebhookBundles(current.metadata.resource_version, tuple(bundles))

    async def set_bundle(self, bundle: bytes, current: WebhookBundles) -> None:
        ops: list[dict[str, Any]] = [
            # A concurrent edit makes this fail instead of being lost.
            {"op": "test", "path": "/metadata/resourceVersion", "value": current.resource_version}
        ]
        ops.extend(
            {"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": _b64(bundle)}
            for index, have in enumerate(current.bundles)
            if have != bundle
        )
        try:
            await self._admission.patch_mutating_webhook_configuration(self.name, ops, **TIMEOUT)
        except client.exceptions.ApiException as err:
            # 422: the resourceVersion test failed; 409: a write raced ours.
            if is_status(err, 409, 422):
                raise Conflict(self.name) from None
            raise
