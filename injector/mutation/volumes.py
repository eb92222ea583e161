"""The shared mount dir, the cache, and (when the pod opts out of automount) a token."""

from __future__ import annotations

from typing import Any

from injector.mutation.context import MutationContext

TOKEN_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def existing_token_volume(ctx: MutationContext) -> str | None:
    """The service-account token volume the pod's containers already mount, if any.

    The ServiceAccount admission plugin runs before webhooks: it mounted the
    token into the containers it saw, not into the sidecar we add, so the
    sidecar mounts that same volume, or (automount off for the pod or its
    service account) a token projected for it alone.
    """
    ours = ctx.config.sidecar.container_name
    volumes = {v.get("name"): v for v in ctx.spec.get("volumes") or [] if isinstance(v, dict)}
    for key in ("containers", "initContainers"):
        for container in ctx.containers(key):
            if container.get("name") == ours:
                continue
            for mount in container.get("volumeMounts") or []:
                if isinstance(mount, dict) and mount.get("mountPath") == TOKEN_MOUNT_PATH:
                    name = mount.get("name")
                    return str(name) if _is_plain_token(volumes.get(name)) else None
    return None


def _is_plain_token(volume: dict[str, Any] | None) -> bool:
    """A projected token for the apiserver's own audience, as the admission plugin makes.

    Anything else at that path (a legacy token Secret, a custom audience) would
    get the sidecar's API calls refused, so it gets its own projection instead.
    """
    sources = ((volume or {}).get("projected") or {}).get("sources") or []
    tokens = [s.get("serviceAccountToken") for s in sources if isinstance(s, dict)]
    return any(isinstance(t, dict) and not t.get("audience") for t in tokens)


def wants_own_token(ctx: MutationContext) -> bool:
    found = ctx.sidecar_index()
    if found is None:
        return existing_token_volume(ctx) is None
    # Already injected: the sidecar's own mounts say whether it uses ours.
    sidecar = ctx.containers(found[0])[found[1]]
    name = ctx.config.volumes.token_name
    return any(
        isinstance(m, dict) and m.get("name") == name for m in sidecar.get("volumeMounts") or []
    )


def token_volume_name(ctx: MutationContext) -> str:
    return existing_token_volume(ctx) or ctx.config.volumes.token_name


def token_volume(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "projected": {
            "defaultMode": 0o444,
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {
                    "configMap": {
                        "name": "kube-root-ca.crt",
                        "items": [{"key": "ca.crt", "path": "ca.crt"}],
                    }
                },
                {
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "namespace",
                                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                            }
                        ]
                    }
                },
            ],
        },
    }


def desired_volumes(ctx: MutationContext) -> list[dict[str, Any]]:
    names = ctx.config.volumes
    cache: dict[str, Any] = {"sizeLimit": ctx.plan.cache_size}
    if names.cache_medium:
        cache["medium"] = names.cache_medium
    volumes: list[dict[str, Any]] = [
        {"name": names.mount_dir_name, "emptyDir": {}},
        {"name": names.cache_name, "emptyDir": cache},
    ]
    if wants_own_token(ctx):
        volumes.append(token_volume(names.token_name))
    return volumes


def add_volumes(ctx: MutationContext) -> None:
    present = {v.get("name") for v in ctx.spec.get("volumes") or [] if isinstance(v, dict)}
    for volume in desired_volumes(ctx):
        if volume["name"] not in present:
            ctx.patch.append(("spec", "volumes"), volume)
