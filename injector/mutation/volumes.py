"""The shared mount dir, the cache, and (when the pod opts out of automount) a token."""

from __future__ import annotations

from typing import Any

from injector.mutation.context import MutationContext


def needs_own_token(ctx: MutationContext) -> bool:
    # The sidecar patches its pod's status; without automount it has no
    # token unless we project one for it alone.
    return ctx.spec.get("automountServiceAccountToken") is False


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
    if needs_own_token(ctx):
        volumes.append(token_volume(names.token_name))
    return volumes


def add_volumes(ctx: MutationContext) -> None:
    present = {v.get("name") for v in ctx.spec.get("volumes") or [] if isinstance(v, dict)}
    for volume in desired_volumes(ctx):
        if volume["name"] not in present:
            ctx.patch.append(("spec", "volumes"), volume)
