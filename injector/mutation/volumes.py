"""Our volumes: the shared mount dir, the cache, and (when needed) the sidecar's token.

The cache is the pod's emptyDir (pod mode) or, in node mode, a hostPath: the
JuiceFS volume's subdirectory of the node cache directory the config names
(never a pod annotation). Only the sidecar mounts it.
"""

from __future__ import annotations

from typing import Any

from injector.mutation.context import MutationContext
from injector.mutation.token import choose_token, projected_token_volume


def cache_volume(ctx: MutationContext) -> dict[str, Any]:
    """The pod's own emptyDir, or the JuiceFS volume's directory in the node cache."""
    name, plan = ctx.owned.cache_volume, ctx.plan
    if plan.cache_mode == "node":
        assert plan.node_cache_dir is not None  # the plan only chooses node with a path
        return {
            "name": name,
            "hostPath": {"path": plan.node_cache_dir, "type": "DirectoryOrCreate"},
        }
    cache: dict[str, Any] = {"sizeLimit": plan.cache_size}
    if ctx.config.volumes.cache_medium:
        cache["medium"] = ctx.config.volumes.cache_medium
    return {"name": name, "emptyDir": cache}


def desired_volumes(ctx: MutationContext) -> list[dict[str, Any]]:
    owned = ctx.owned
    volumes: list[dict[str, Any]] = [
        {"name": owned.mount_dir_volume, "emptyDir": {}},
        cache_volume(ctx),
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
