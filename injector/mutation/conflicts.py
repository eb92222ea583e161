"""Refuse pods whose own names or mounts collide with what we inject."""

from __future__ import annotations

from injector.mutation.context import MutationContext


def find_conflicts(ctx: MutationContext) -> list[str]:
    config = ctx.config
    problems: list[str] = []
    hint = f"rename it or opt the pod out with label {config.labels.inject}=false"
    if not ctx.plan.already_injected:
        name = config.sidecar.container_name
        for key in ("initContainers", "containers", "ephemeralContainers"):
            if any(c.get("name") == name for c in ctx.containers(key)):
                problems.append(f"spec.{key} already has a container named {name!r}; {hint}")
        ours = {config.volumes.mount_dir_name, config.volumes.cache_name, config.volumes.token_name}
        for volume in ctx.spec.get("volumes") or []:
            if isinstance(volume, dict) and volume.get("name") in ours:
                problems.append(
                    f"spec.volumes already has a volume named {volume['name']!r}; {hint}"
                )
    target = config.models.app_mount_path.rstrip("/")
    for key, _, container in ctx.model_consumers():
        for mount in container.get("volumeMounts") or []:
            if not isinstance(mount, dict):
                continue
            if str(mount.get("mountPath", "")).rstrip("/") == target and (
                mount.get("name") != config.volumes.mount_dir_name
            ):
                problems.append(
                    f"container {container.get('name')!r} in spec.{key} already mounts volume "
                    f"{mount.get('name')!r} at {target}, where the JuiceFS models are mounted"
                )
    return problems
