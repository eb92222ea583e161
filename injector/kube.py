"""Kubernetes API access: one client, from a kubeconfig or the pod's service account."""

from __future__ import annotations

import os
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

APPLY = "application/apply-patch+yaml"
FIELD_MANAGER = "bento-juicefs-injector"
# Without it kubernetes_asyncio waits forever on a blackholed apiserver.
TIMEOUT: dict[str, Any] = {"_request_timeout": 30}

__all__ = ["APPLY", "FIELD_MANAGER", "TIMEOUT", "ApiException", "is_status", "new_api_client"]


async def new_api_client(kubeconfig: str | None) -> Any:
    """ApiClient for the kubeconfig given, else in-cluster, else KUBECONFIG/~/.kube/config."""
    if kubeconfig:
        await config.load_kube_config(config_file=kubeconfig)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    else:
        await config.load_kube_config()
    return client.ApiClient()


def is_status(err: BaseException, *codes: int) -> bool:
    return isinstance(err, ApiException) and err.status in codes
