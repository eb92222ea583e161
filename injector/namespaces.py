"""The namespace controller: what an opted-in namespace's pods need, and nothing after.

For each namespace with the opt-in label it server-side-applies a copy of the
JuiceFS credentials Secret of each volume the namespace may use
(`juicefs.volumeNamespaces`) from the injector's namespace, and deletes a
copy it made whose volume was since taken from the namespace. What it created
is recorded in the namespace's `juicefs.bentoml.com/provisioned` annotation;
when the label goes, exactly that goes. It never lists or reads the
namespace's Secrets, and never takes over an object someone else created
with the same name. Charts stay untouched.

Older versions also bound a readiness role (`bento-juicefs-models-ready`) to
the namespace's service accounts, so that a privileged sidecar could set its
pod's condition. Only the node agent sets it now, and no credential of a
tenant namespace may: a RoleBinding the record names is deleted the next
time the namespace is reconciled, and dropped from the record. Nothing it
logs holds a Secret's data: the names of what it made, and an API error's
status and reason, never its body.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from kubernetes_asyncio import client, watch

from injector.config import InjectorConfig
from injector.kube import APPLY, FIELD_MANAGER, KUBE_API, TIMEOUT, is_status
from injector.lifecycle import CleanupContext, background

log = structlog.get_logger("injector.namespaces")

MANAGED_BY = "app.kubernetes.io/managed-by"
PROVISIONED = "juicefs.bentoml.com/provisioned"
# The readiness RoleBinding older versions created in opted-in namespaces;
# the injector's RBAC lets it delete this name, and nothing else of the kind.
LEGACY_ROLE_BINDING = "bento-juicefs-models-ready"


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


def credential_secret_names(config: InjectorConfig, namespace: str | None = None) -> list[str]:
    """The credentials Secrets of every volume, or of the volumes namespace may use."""
    template = config.juicefs.secret_name_template
    volumes = (
        config.juicefs.allowed_volumes if namespace is None else config.namespace_volumes(namespace)
    )
    return [template.format(volume=volume) for volume in volumes]


def unassigned_secrets(recorded: str | None, wanted: Collection[str]) -> tuple[str, ...]:
    """The credentials copies the record names that the namespace may no longer have:
    an administrator took their volume from it (juicefs.volumeNamespaces)."""
    return tuple(
        name for kind, name in recorded_objects(recorded) if kind == "secret" and name not in wanted
    )


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


def recorded_objects(recorded: str | None) -> list[tuple[str, str]]:
    """(kind, name) of each object the provisioned annotation says the controller made."""
    items = []
    for item in (recorded or "").split(","):
        kind, _, name = item.strip().partition("/")
        if kind and name:
            items.append((kind, name))
    return items


@dataclass(frozen=True)
class LegacyRoleBindings:
    """The readiness RoleBindings an older version recorded in a namespace."""

    # Ours by name: deleted, then dropped from the record.
    to_delete: tuple[str, ...] = ()
    # Made under another controller.roleName: the injector may not delete
    # them (its RBAC names one RoleBinding), so they are dropped from the
    # record and left to an administrator, with a warning.
    by_hand: tuple[str, ...] = ()


def legacy_role_bindings(recorded: str | None) -> LegacyRoleBindings:
    """What of an older version's readiness RBAC the record names, and who removes it."""
    names = [name for kind, name in recorded_objects(recorded) if kind == "rolebinding"]
    return LegacyRoleBindings(
        to_delete=tuple(n for n in names if n == LEGACY_ROLE_BINDING),
        by_hand=tuple(n for n in names if n != LEGACY_ROLE_BINDING),
    )


def describe_error(err: BaseException) -> str:
    """What to log about a failure: an API error's status and reason, never its body."""
    if isinstance(err, client.exceptions.ApiException):
        return f"API error {err.status} {err.reason}"
    return f"{type(err).__name__}: {err}"


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
        annotations = namespace.metadata.annotations
        if opted_in(name, labels, self._config):
            await self._apply(name, sources, annotations)
        else:
            await self._remove(name, annotations)

    async def _apply(
        self,
        namespace: str,
        sources: list[dict[str, Any]],
        annotations: Mapping[str, str] | None,
    ) -> None:
        # Before the record is rewritten without it: once dropped from the
        # record, nothing would say the RoleBinding was ours.
        await self._remove_legacy_bindings(namespace, (annotations or {}).get(PROVISIONED))
        # No force: a Secret of the tenant's own with our name is theirs (the
        # apply conflicts, and we leave it alone and say so).
        recorded = (annotations or {}).get(PROVISIONED)
        wanted = credential_secret_names(self._config, namespace)
        # Only the volumes assigned to this namespace: another tenant's
        # credentials never land here, and a copy whose volume was taken away
        # goes now.
        for name in unassigned_secrets(recorded, wanted):
            await _delete(self._core.delete_namespaced_secret, name, namespace)
            log.info("namespace.credentials_withdrawn", namespace=namespace, secret=name)
        kwargs: dict[str, Any] = {"field_manager": FIELD_MANAGER, "_content_type": APPLY, **TIMEOUT}
        made: list[str] = []
        for source in sources:
            name = source["metadata"]["name"]
            if name not in wanted:
                continue
            body = desired_secret(namespace, source, self._config)
            if await _applied(self._core.patch_namespaced_secret, name, namespace, body, kwargs):
                made.append(f"secret/{name}")
        # What we created is recorded on the namespace, so that removing it
        # later needs neither a list nor a read of the namespace's Secrets.
        await self._record(namespace, made)
        log.info("namespace.provisioned", namespace=namespace, objects=made)

    async def _remove_legacy_bindings(self, namespace: str, recorded: str | None) -> int:
        legacy = legacy_role_bindings(recorded)
        removed = 0
        for name in legacy.to_delete:
            removed += await _delete(self._rbac.delete_namespaced_role_binding, name, namespace)
        if legacy.to_delete:
            log.info("namespace.legacy_rbac_deleted", namespace=namespace, removed=removed)
        if legacy.by_hand:
            log.warning(
                "namespace.legacy_rbac_left",
                namespace=namespace,
                rolebindings=list(legacy.by_hand),
                reason="an older version made them under another controller.roleName; "
                "delete them by hand",
            )
        return removed

    async def _record(self, namespace: str, made: list[str]) -> None:
        value = ",".join(sorted(made)) if made else None
        patch = {"metadata": {"annotations": {PROVISIONED: value}}}
        await self._core.patch_namespace(namespace, patch, **TIMEOUT)

    async def _remove(self, namespace: str, annotations: Mapping[str, str] | None) -> None:
        recorded = (annotations or {}).get(PROVISIONED)
        if not recorded:
            return
        removed = await self._remove_legacy_bindings(namespace, recorded)
        for kind, name in recorded_objects(recorded):
            if kind == "secret":
                removed += await _delete(self._core.delete_namespaced_secret, name, namespace)
        await self._record(namespace, [])
        log.info("namespace.cleaned", namespace=namespace, removed=removed)

    async def reconcile_all(self) -> str:
        """Reconcile every namespace; returns the list's resourceVersion to watch from."""
        sources = await self._sources()
        namespaces = await self._core.list_namespace(**TIMEOUT)
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
