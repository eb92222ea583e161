"""The sidecar's only API calls: its own pod's condition, and Events about it.

It authenticates with the pod's service-account token (bound to the pod, which
is what the readiness fence policy checks). API errors are retried with
backoff; an Event that cannot be sent is logged and dropped, never fatal.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import aiohttp
import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

from common.kubeevents import condition_patch, event_body, pod_involved
from sidecar.env import Settings

log = structlog.get_logger("sidecar.kube")

COMPONENT = "juicefs-mount"
STRATEGIC = "application/strategic-merge-patch+json"


def api_client(token_dir: Path) -> client.ApiClient:
    configuration = client.Configuration()
    loader = InClusterConfigLoader(
        token_filename=str(token_dir / "token"),
        cert_filename=str(token_dir / "ca.crt"),
    )
    loader.load_and_set(configuration)
    return client.ApiClient(configuration)


class PodReporter:
    """The sidecar's `Reporter`: Events and its own pod's condition, via the apiserver."""

    def __init__(self, settings: Settings, api: client.ApiClient) -> None:
        self._settings = settings
        self._core = client.CoreV1Api(api)
        self._uid = settings.pod_uid

    async def set_condition(
        self, status: str, reason: str, message: str, attempts: int | None = 8
    ) -> None:
        """Patch our condition; retry until done (attempts=None: until cancelled).

        A 403 is retried too: the namespace's RoleBinding may still be on its
        way. Only a pod that is gone (404) or a refused body (400/422) stop it.
        """
        s = self._settings
        body = condition_patch(s.condition_type, status, reason, message)
        delay = 0.5
        attempt = 0
        while True:
            attempt += 1
            last = attempts is not None and attempt >= attempts
            try:
                # Conditions merge by type: the kubelet's own stay as they are.
                options: dict[str, Any] = {"_content_type": STRATEGIC, "_request_timeout": 15}
                await self._core.patch_namespaced_pod_status(
                    s.pod_name, s.pod_namespace, body, **options
                )
                log.info("condition.set", type=s.condition_type, status=status, reason=reason)
                return
            except client.exceptions.ApiException as err:
                if err.status in (400, 404, 422) or last:
                    raise
                log.warning("condition.retry", status=err.status, attempt=attempt)
            except (OSError, TimeoutError, aiohttp.ClientError) as err:
                if last:
                    raise
                log.warning(
                    "condition.retry", error=str(err) or type(err).__name__, attempt=attempt
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def event(self, kind: str, reason: str, message: str) -> None:
        s = self._settings
        body = event_body(
            namespace=s.pod_namespace,
            involved=pod_involved(s.pod_name, s.pod_namespace, self._uid or None),
            kind=kind,
            reason=reason,
            message=message,
            component=COMPONENT,
            instance=s.pod_name,
            host=s.node_name,
        )
        try:
            timeout: dict[str, Any] = {"_request_timeout": 10}
            await self._core.create_namespaced_event(s.pod_namespace, cast(Any, body), **timeout)
        except (client.exceptions.ApiException, OSError, TimeoutError, aiohttp.ClientError) as err:
            log.warning("event.dropped", reason=reason, error=str(err) or type(err).__name__)
