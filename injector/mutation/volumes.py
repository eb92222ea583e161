"""Our volumes: the shared mount dir, the cache, and the sidecar's agent volume.

All three are emptyDirs. The cache is the pod's own (pod mode, with a
sizeLimit) or, in node mode, an empty mount point onto which the node agent
bind-mounts the JuiceFS volume's directory of the node cache read-only; which
directory is the config's (never a pod annotation's) and the agent's to
resolve, so a tenant pod holds no hostPath. Only the sidecar mounts the
cache and the agent volume.
"""

from __future__ import annotations

from typing import Any

from injector.mutation.context import MutationContext

# The agent volume holds a unix socket and an empty mount point: tmpfs, tiny.
AGENT_VOLUME_SIZE = "1Mi"


def cache_volume(ctx: MutationContext) -> dict[str, Any]:
    """The pod's own cache, or the mount point of the node cache."""
    name, plan = ctx.owned.cache_volume, ctx.plan
    if plan.cache_mode == "node":
        return {"name": name, "emptyDir": {}}
    cache: dict[str, Any] = {"sizeLimit": plan.cache_size}
    if ctx.config.volumes.cache_medium:
        cache["medium"] = ctx.config.volumes.cache_medium
    return {"name": name, "emptyDir": cache}


def agent_volume(name: str) -> dict[str, Any]:
    return {"name": name, "emptyDir": {"medium": "Memory", "sizeLimit": AGENT_VOLUME_SIZE}}


def desired_volumes(ctx: MutationContext) -> list[dict[str, Any]]:
    owned = ctx.owned
    return [
        {"name": owned.mount_dir_volume, "emptyDir": {}},
        cache_volume(ctx),
        agent_volume(owned.agent_volume),
    ]


def add_volumes(ctx: MutationContext) -> None:
    present = {v.get("name") for v in ctx.spec.get("volumes") or [] if isinstance(v, dict)}
    for volume in desired_volumes(ctx):
        if volume["name"] not in present:
            ctx.patch.append(("spec", "volumes"), volume)
        ctx.record.volumes.append(volume["name"])
