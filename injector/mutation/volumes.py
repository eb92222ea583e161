"""Our volumes: the shared mount dir, the cache, and (when needed) the sidecar's token."""

from __future__ import annotations

from typing import Any

from injector.mutation.context import MutationContext
from injector.mutation.token import choose_token, projected_token_volume


def desired_volumes(ctx: MutationContext) -> list[dict[str, Any]]:
    owned = ctx.owned
    cache: dict[str, Any] = {"sizeLimit": ctx.plan.cache_size}
    if ctx.config.volumes.cache_medium:
        cache["medium"] = ctx.config.volumes.cache_medium
    volumes: list[dict[str, Any]] = [
        {"name": owned.mount_dir_volume, "emptyDir": {}},
        {"name": owned.cache_volume, "emptyDir": cache},
    ]
    if choose_token(ctx).projected_by_us:
        volumes.append(projected_token_volume(owned.token_volume))
    return volumes


def add_volumes(ctx: MutationContext) -> None:
    present = {v.get("name") for v in ctx.spec.get("volumes") or [] if isinstance(v, dict)}
    for volume in desired_volumes(ctx):
        if volume["name"] not in present:
            ctx.patch.append(("spec", "volumes"), volume)
        ctx.record.volumes.append(volume["name"])
