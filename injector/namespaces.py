"""The namespace controller: what an opted-in namespace's pods need, and nothing after.

For each namespace with the opt-in label it server-side-applies a copy of the
JuiceFS credentials Secret(s) from the injector's namespace and a Role and
RoleBinding that let the namespace's service accounts patch `pods/status`
(the ValidatingAdmissionPolicy narrows that to a pod's own condition). When
the label goes, what it created goes too; it never touches objects that do
not carry its managed-by label. Charts stay untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import structlog
from kubernetes_asyncio import client, watch

from injector.config import InjectorConfig
from injector.kube import APPLY, FIELD_MANAGER, is_status

log = structlog.get_logger("injector.namespaces")

MANAGED_BY = "app.kubernetes.io/managed-by"


def opted_in(namespace: str, labels: Mapping[str, str] | None, config: InjectorConfig) -> bool:
    if namespace in config.excluded_namespaces:
        return False
    keys = config.labels
    return bool((labels or {}).get(keys.namespace_opt_in) == keys.namespace_opt_in_value)


def _metadata(name: str, namespace: str, config: InjectorConfig) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": {MANAGED_BY: config.controller.managed_by},
    }


def credential_secret_names(config: InjectorConfig) -> list[str]:
    template = config.juicefs.secret_name_template
    return [template.format(volume=volume) for volume in config.juicefs.allowed_volumes]


def desired_secret(
    namespace: str, source: Mapping[str, Any], config: InjectorConfig
) -> dict[str, Any]:
    """A copy of a source Secret (its data and type only) for namespace."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(source["metadata"]["name"], namespace, config),
        "type": source.get("type") or "Opaque",
        "data": dict(source.get("data") or {}),
    }


def desired_rbac(namespace: str, config: InjectorConfig) -> list[dict[str, Any]]:
    name = config.controller.role_name
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(name, namespace, config),
        "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["get", "patch"]},
            {
                "apiGroups": ["", "events.k8s.io"],
                "resources": ["events"],
                "verbs": ["create", "patch"],
            },
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(name, namespace, config),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [
            {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Group",
                "name": f"system:serviceaccounts:{namespace}",
            }
        ],
    }
    return [role, binding]


class NamespaceController:
    def __init__(self, api: Any, config: InjectorConfig) -> None:
        self._config = config
        self._core = client.CoreV1Api(api)
        self._rbac = client.RbacAuthorizationV1Api(api)

    async def _sources(self) -> list[dict[str, Any]]:
        sources = []
        namespace = self._config.webhook.namespace
        for name in credential_secret_names(self._config):
            try:
                secret = await self._core.read_namespaced_secret(name, namespace)
            except client.exceptions.ApiException as err:
                if err.status == 404:
                    log.warning("credentials.missing", secret=f"{namespace}/{name}")
                    continue
                raise
            sources.append(
                {"metadata": {"name": name}, "type": secret.type, "data": secret.data or {}}
            )
        return sources

    async def reconcile(
        self, namespace: str, labels: Mapping[str, str] | None, sources: list[dict[str, Any]]
    ) -> None:
        if namespace in self._config.excluded_namespaces:
            return  # our own namespace holds the CA and the source Secrets: never touch it
        if opted_in(namespace, labels, self._config):
            await self._apply(namespace, sources)
        else:
            await self._remove(namespace)

    async def _apply(self, namespace: str, sources: list[dict[str, Any]]) -> None:
        kwargs: dict[str, Any] = {
            "field_manager": FIELD_MANAGER,
            "force": True,
            "_content_type": APPLY,
        }
        for source in sources:
            body = desired_secret(namespace, source, self._config)
            await self._core.patch_namespaced_secret(
                body["metadata"]["name"], namespace, body, **kwargs
            )
        role, binding = desired_rbac(namespace, self._config)
        await self._rbac.patch_namespaced_role(role["metadata"]["name"], namespace, role, **kwargs)
        await self._rbac.patch_namespaced_role_binding(
            binding["metadata"]["name"], namespace, binding, **kwargs
        )
        log.info("namespace.provisioned", namespace=namespace, secrets=len(sources))

    async def _remove(self, namespace: str) -> None:
        selector = f"{MANAGED_BY}={self._config.controller.managed_by}"
        removed = 0
        secrets = await self._core.list_namespaced_secret(namespace, label_selector=selector)
        for secret in secrets.items:
            removed += await _delete(
                self._core.delete_namespaced_secret, secret.metadata.name, namespace
            )
        roles = await self._rbac.list_namespaced_role(namespace, label_selector=selector)
        for role in roles.items:
            removed += await _delete(
                self._rbac.delete_namespaced_role, role.metadata.name, namespace
            )
        bindings = await self._rbac.list_namespaced_role_binding(namespace, label_selector=selector)
        for binding in bindings.items:
            removed += await _delete(
                self._rbac.delete_namespaced_role_binding, binding.metadata.name, namespace
            )
        if removed:
            log.info("namespace.cleaned", namespace=namespace, removed=removed)

    async def reconcile_all(self) -> str:
        """Reconcile every namespace; returns the list's resourceVersion to watch from."""
        sources = await self._sources()
        namespaces = await self._core.list_namespace()
        for ns in namespaces.items:
            if ns.status and ns.status.phase == "Terminating":
                continue
            await self._guarded(ns.metadata.name, ns.metadata.labels, sources)
        return str(namespaces.metadata.resource_version)

    async def _guarded(
        self, namespace: str, labels: Mapping[str, str] | None, sources: list[dict[str, Any]]
    ) -> None:
        try:
            await self.reconcile(namespace, labels, sources)
        except client.exceptions.ApiException as err:
            # A namespace being deleted refuses new objects; that is fine.
            log.warning(
                "namespace.reconcile_failed",
                namespace=namespace,
                status=err.status,
                reason=err.reason,
            )

    async def run(self) -> None:
        """List, then watch; relist on every resync period and after watch errors."""
        resync = self._config.controller.resync_seconds
        while True:
            try:
                version = await self.reconcile_all()
                stream = watch.Watch()
                async with stream:
                    async for event in stream.stream(
                        self._core.list_namespace,
                        resource_version=version,
                        timeout_seconds=int(resync),
                    ):
                        ns = event["object"]
                        if event["type"] in ("ADDED", "MODIFIED") and not (
                            ns.status and ns.status.phase == "Terminating"
                        ):
                            # Read the sources now, not at watch start: the platform
                            # team may have just updated them.
                            sources = await self._sources()
                            await self._guarded(ns.metadata.name, ns.metadata.labels, sources)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # keep the controller alive through API hiccups
                log.warning("namespaces.watch_error", error=str(err))
                await asyncio.sleep(2)


async def _delete(delete: Any, name: str, namespace: str) -> int:
    try:
        await delete(name, namespace)
    except client.exceptions.ApiException as err:
        if is_status(err, 404):
            return 0
        raise
    return 1


@contextlib.asynccontextmanager
async def running_controller(api: Any, config: InjectorConfig) -> Any:
    task = asyncio.create_task(NamespaceController(api, config).run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
