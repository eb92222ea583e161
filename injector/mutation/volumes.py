"""Our volumes: the shared mount dir, the cache, and the sidecar's token or agent volume.

The cache is the pod's emptyDir (pod mode) or, in node mode, the JuiceFS
volume's subdirectory of the node cache directory the config names (never a
pod annotation): a hostPath for the privileged sidecar; for the unprivileged
one an empty emptyDir, onto which the node agent bind-mounts that directory
read-only, so a tenant pod has no hostPath at all. Only the sidecar mounts it.
The privileged sidecar gets a token (when it cannot share the pod's); the
unprivileged one, no credential but the node agent's socket in its agent volume.
"""

from __future__ import annotations

from typing import Any

from injector.mutation.context import MutationContext
from injector.mutation.token import choose_token, projected_token_volume

# The agent volume holds a unix socket and an empty mount point: tmpfs, tiny.
AGENT_VOLUME_SIZE = "1Mi"


def cache_volume(ctx: MutationContext) -> dict[str, Any]:
    """The pod's own emptyDir, or the JuiceFS volume's directory in the node cache."""
    name, plan = ctx.owned.cache_volume, ctx.plan
    if plan.cache_mode == "node":
        if ctx.config.sidecar.unprivileged:
            # Only the mount point: the node agent bind-mounts the node cache here.
            return {"name": name, "emptyDir": {}}
        assert plan.node_cache_dir is not None  # the plan only chooses node with a path
        return {
            "name": name,
            "hostPath": {"path": plan.node_cache_dir, "type": "DirectoryOrCreate"},
        }
    cache: dict[str, Any] = {"sizeLimit": plan.cache_size}
    if ctx.config.volumes.cache_medium:
        cache["medium"] = ctx.config.volumes.cache_medium
    return {"name": name, "emptyDir": cache}


def agent_volume(name: str) -> dict[str, Any]:
    return {"name": name, "emptyDir": {"medium": "Memory", "sizeLimit": AGENT_VOLUME_SIZE}}


def desired_volumes(ctx: MutationContext) -> list[dict[str, Any]]:
    owned = ctx.owned
    volumes: list[dict[str, Any]] = [
        {"name": owned.mount_dir_volume, "emptyDir": {}},
        cache_volume(ctx),
    ]
    if ctx.config.sidecar.unprivileged:
        volumes.append(agent_volume(owned.agent_volume))
    elif choose_token(ctx).projected_by_us:
        volumes.append(projected_token_volume(owned.token_volume))
    return volumes


def add_volumes(ctx: MutationContext) -> None:
    present = {v.get("name") for v in ctx.spec.get("volumes") or [] if isinstance(v, dict)}
    for volume in desired_volumes(ctx):
        if volume["name"] not in present:
            ctx.patch.append(("spec", "volumes"), volume)
        ctx.record.volumes.append(volume["name"])
