"""The shared CA Secret through the API: read, create, and replace what was read.

Create and replace are the only writes, and both fail with `Conflict` when
another replica wrote first (409 on create; a changed resourceVersion, or a
deleted Secret, on replace): the caller reads again.
"""

from __future__ import annotations

import base64
from typing import Any, cast

from kubernetes_asyncio import client

from injector.config import InjectorConfig
from injector.kube import FIELD_MANAGER, TIMEOUT, is_status
from injector.pki.shared_ca import Conflict, StoredSecret


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class KubeSecretStore:
    def __init__(self, api: Any, config: InjectorConfig) -> None:
        self._core = client.CoreV1Api(api)
        self.namespace = config.webhook.namespace
        self.name = config.webhook.ca_secret_name
        self._managed_by = config.controller.managed_by

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    async def read(self) -> StoredSecret | None:
        try:
            secret = await self._core.read_namespaced_secret(self.name, self.namespace, **TIMEOUT)
        except client.exceptions.ApiException as err:
            if err.status == 404:
                return None
            raise
        data: dict[str, bytes] = {}
        for key, value in (secret.data or {}).items():
            try:
                data[key] = base64.b64decode(value or "")
            except ValueError:
                data[key] = b""
        return StoredSecret(
            data, dict(secret.metadata.annotations or {}), secret.metadata.resource_version
        )

    def _body(
        self, data: dict[str, bytes], annotations: dict[str, str], resource_version: str = ""
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "labels": {"app.kubernetes.io/managed-by": self._managed_by},
            "annotations": annotations,
        }
        if resource_version:
            metadata["resourceVersion"] = resource_version
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata,
            "type": "Opaque",
            "data": {key: _b64(value) for key, value in data.items()},
        }

    async def create(self, data: dict[str, bytes], annotations: dict[str, str]) -> None:
        try:
            await self._core.create_namespaced_secret(
                self.namespace,
                cast(Any, self._body(data, annotations)),
                field_manager=FIELD_MANAGER,
                **TIMEOUT,
            )
        except client.exceptions.ApiException as err:
            if is_status(err, 409):
                raise Conflict(str(self)) from None
            raise

    async def replace(
        self, data: dict[str, bytes], annotations: dict[str, str], resource_version: str
    ) -> None:
        try:
            await self._core.replace_namespaced_secret(
                self.name,
                self.namespace,
                cast(Any, self._body(data, annotations, resource_version)),
                field_manager=FIELD_MANAGER,
                **TIMEOUT,
            )
        except client.exceptions.ApiException as err:
            if is_status(err, 409, 404):  # changed or deleted since we read it
                raise Conflict(str(self)) from None
            raise
