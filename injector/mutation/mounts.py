"""The Bento's model directory, read-only, in every container that loads models."""

from __future__ import annotations

from injector.mutation.context import MutationContext


def add_model_mounts(ctx: MutationContext) -> None:
    volume = ctx.owned.mount_dir_volume
    mount = {
        "name": volume,
        "mountPath": ctx.config.models.app_mount_path,
        "readOnly": True,
        # The FUSE mount appears after the container starts if the sidecar
        # restarts; HostToContainer lets the app see the new mount.
        "mountPropagation": "HostToContainer",
    }
    for key, index, container in ctx.model_consumers():
        mounts = container.get("volumeMounts") or []
        if any(isinstance(m, dict) and m.get("name") == volume for m in mounts):
            continue
        ctx.patch.append(("spec", key, index, "volumeMounts"), dict(mount))
