"""The namespace controller: what an opted-in namespace's pods need, and nothing after.

For each namespace with the opt-in label it server-side-applies a copy of the
JuiceFS credentials Secret(s) from the injector's namespace and a RoleBinding
of the shipped `bento-juicefs-models-ready` ClusterRole that lets the
namespace's service accounts patch `pods/status` (the
ValidatingAdmissionPolicy narrows that to a pod's own condition). What it
created is recorded in the namespace's `juicefs.bentoml.com/provisioned`
annotation; when the label goes, exactly that goes. It never lists or reads
the namespace's Secrets, and never takes over an object someone else created
with the same name. Charts stay untouched.

It also keeps, in memory, each opted-in namespace's Pod Security enforce
labels (`injector.podsecurity`), which the admission review consults: the
AdmissionReview does not carry the namespace's labels. Nothing it logs
holds a Secret's data: the names of what it made, and an API error's status
and reason, never its body.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import structlog
from aiohttp import web
from kubernetes_asyncio import client, watch

from injector.config import InjectorConfig
from injector.kube import APPLY, FIELD_MANAGER, KUBE_API, TIMEOUT, is_status
from injector.lifecycle import CleanupContext, background
from injector.podsecurity import NAMESPACES, NamespaceSecurityRegistry

log = structlog.get_logger("injector.namespaces")

MANAGED_BY = "app.kubernetes.io/managed-by"
PROVISIONED = "juicefs.bentoml.com/provisioned"


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


def desired_binding(namespace: str, config: InjectorConfig) -> dict[str, Any]:
    """Bind the shipped ClusterRole to every service account of the namespace.

    The ClusterRole (manifests/base/rbac.yaml) grants only pods/status patch
    and events create; the injector may bind it (RBAC `bind`) without holding
    those permissions itself.
    """
    name = config.controller.role_name
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(name, namespace, config),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [
            {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Group",
                "name": f"system:serviceaccounts:{namespace}",
            }
        ],
    }


def describe_error(err: BaseException) -> str:
    """What to log about a failure: an API error's status and reason, never its body."""
    if isinstance(err, client.exceptions.ApiException):
        return f"API error {err.status} {err.reason}"
    return f"{type(err).__name__}: {err}"


class NamespaceController:
    def __init__(
        self,
        api: Any,
        config: InjectorConfig,
        security: NamespaceSecurityRegistry = NAMESPACES,
    ) -> None:
        self._config = config
        self._core = client.CoreV1Api(api)
        self._rbac = client.RbacAuthorizationV1Api(api)
        self.security = security

    def observe(self, event: str, namespace: Any) -> None:
        """Keep the Pod Security labels of opted-in namespaces, and only theirs."""
        name, labels = namespace.metadata.name, namespace.metadata.labels
        if event != "DELETED" and opted_in(name, labels, self._config):
            self.security.observe(name, labels)
        else:
            self.security.forget(name)

    async def _sources(self) -> list[dict[str, Any]]:
        sources = []
        namespace = self._config.webhook.namespace
        for name in credential_secret_names(self._config):
            try:
                secret = await self._core.read_namespaced_secret(name, namespace, **TIMEOUT)
            except client.exceptions.ApiException as err:
                if err.status == 404:
                    log.warning("credentials.missing", secret=f"{namespace}/{name}")
                    continue
                raise
            sources.append(
                {"metadata": {"name": name}, "type": secret.type, "data": secret.data or {}}
            )
        return sources

    async def reconcile(self, namespace: Any, sources: list[dict[str, Any]]) -> None:
        name, labels = namespace.metadata.name, namespace.metadata.labels
        if name in self._config.excluded_namespaces:
            return  # our own namespace holds the CA and the source Secrets: never touch it
        if opted_in(name, labels, self._config):
            await self._apply(name, sources)
        else:
            await self._remove(name, namespace.metadata.annotations)

    async def _apply(self, namespace: str, sources: list[dict[str, Any]]) -> None:
        # No force: a Secret or RoleBinding of the tenant's own with our name
        # is theirs (the apply conflicts, and we leave it alone and say so).
        kwargs: dict[str, Any] = {"field_manager": FIELD_MANAGER, "_content_type": APPLY, **TIMEOUT}
        made: list[str] = []
        for source in sources:
            body = desired_secret(namespace, source, self._config)
            name = body["metadata"]["name"]
            if await _applied(self._core.patch_namespaced_secret, name, namespace, body, kwargs):
                made.append(f"secret/{name}")
        binding = desired_binding(namespace, self._config)
        name = binding["metadata"]["name"]
        if await _applied(
            self._rbac.patch_namespaced_role_binding, name, namespace, binding, kwargs
        ):
            made.append(f"rolebinding/{name}")
        # What we created is recorded on the namespace, so that removing it
        # later needs neither a list nor a read of the namespace's Secrets.
        await self._record(namespace, made)
        log.info("namespace.provisioned", namespace=namespace, objects=made)

    async def _record(self, namespace: str, made: list[str]) -> None:
        value = ",".join(sorted(made)) if made else None
        patch = {"metadata": {"annotations": {PROVISIONED: value}}}
        await self._core.patch_namespace(namespace, patch, **TIMEOUT)

    async def _remove(self, namespace: str, annotations: Mapping[str, str] | None) -> None:
        recorded = (annotations or {}).get(PROVISIONED)
        if not recorded:
            return
        removed = 0
        deleters = {
            "secret": self._core.delete_namespaced_secret,
            "rolebinding": self._rbac.delete_namespaced_role_binding,
        }
        for item in recorded.split(","):
            kind, _, name = item.partition("/")
            if kind in deleters and name:
                removed += await _delete(deleters[kind], name, namespace)
        await self._record(namespace, [])
        log.info("namespace.cleaned", namespace=namespace, removed=removed)

    async def reconcile_all(self) -> str:
        """Reconcile every namespace; returns the list's resourceVersion to watch from."""
        sources = await self._sources()
        namespaces = await self._core.list_namespace(**TIMEOUT)
        self.security.retain(ns.metadata.name for ns in namespaces.items)
        for ns in namespaces.items:
            self.observe("ADDED", ns)
        for ns in namespaces.items:
            if ns.status and ns.status.phase == "Terminating":
                continue
            await self._guarded(ns, sources)
        return str(namespaces.metadata.resource_version)

    async def _guarded(self, namespace: Any, sources: list[dict[str, Any]]) -> None:
        try:
            await self.reconcile(namespace, sources)
        except client.exceptions.ApiException as err:
            # A namespace being deleted refuses new objects; that is fine.
            log.warning(
                "namespace.reconcile_failed",
                namespace=namespace.metadata.name,
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
                        # The client gives up a little after the server would.
                        _request_timeout=int(resync) + 30,
                    ):
                        ns = event["object"]
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            self.observe(event["type"], ns)
                        if event["type"] in ("ADDED", "MODIFIED") and not (
                            ns.status and ns.status.phase == "Terminating"
                        ):
                            # Read the sources now, not at watch start: the platform
                            # team may have just updated them.
                            sources = await self._sources()
                            await self._guarded(ns, sources)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # keep the controller alive through API hiccups
                log.warning("namespaces.watch_error", error=describe_error(err))
                await asyncio.sleep(2)


async def _applied(
    patch: Any, name: str, namespace: str, body: dict[str, Any], kwargs: dict[str, Any]
) -> bool:
    try:
        await patch(name, namespace, body, **kwargs)
    except client.exceptions.ApiException as err:
        if err.status != 409:
            raise
        log.warning(
            "namespace.not_ours",
            namespace=namespace,
            name=name,
            reason="exists, owned by someone else",
        )
        return False
    return True


async def _delete(delete: Any, name: str, namespace: str) -> int:
    try:
        await delete(name, namespace, **TIMEOUT)
    except client.exceptions.ApiException as err:
        if is_status(err, 404):
            return 0
        raise
    return 1


def namespace_controller(config: InjectorConfig) -> CleanupContext:
    """Run the controller on app[KUBE_API] from startup until cleanup."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        async with background(NamespaceController(app[KUBE_API], config).run()):
            yield

    return context
