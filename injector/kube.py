"""Kubernetes API access: one client, from a kubeconfig or the pod's service account."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from injector.lifecycle import CleanupContext

APPLY = "application/apply-patch+yaml"
FIELD_MANAGER = "bento-juicefs-injector"
# Without it kubernetes_asyncio waits forever on a blackholed apiserver.
TIMEOUT: dict[str, Any] = {"_request_timeout": 30}

__all__ = [
    "APPLY",
    "FIELD_MANAGER",
    "KUBE_API",
    "TIMEOUT",
    "ApiException",
    "api_client",
    "is_status",
    "new_api_client",
]

# The one API client of a server that talks to its cluster.
KUBE_API = web.AppKey("kube_api", client.ApiClient)


async def new_api_client(kubeconfig: str | None, context: str | None = None) -> Any:
    """ApiClient for the kubeconfig given, else in-cluster, else KUBECONFIG/~/.kube/config.

    A context names one of the kubeconfig's contexts (else its current one);
    asking for one means a kubeconfig, even inside a pod."""
    if kubeconfig or context:
        await config.load_kube_config(config_file=kubeconfig, context=context)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    else:
        await config.load_kube_config()
    return client.ApiClient()


def is_status(err: BaseException, *codes: int) -> bool:
    return isinstance(err, ApiException) and err.status in codes


def api_client(kubeconfig: str | None) -> CleanupContext:
    """Open app[KUBE_API] at startup; close it (its connection pool) at cleanup."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        api = await new_api_client(kubeconfig)
        app[KUBE_API] = api
        try:
            yield
        finally:
            await api.close()

    return context
