"""What the injector owns in a pod: one list, read by every step and every check.

A pod's own container or volume with one of these names clashes with ours;
a pod that claims (by the status annotation) to be injected must have these
exactly as the injector makes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from injector.config import InjectorConfig


@dataclass(frozen=True)
class Owned:
    container: str
    mount_dir_volume: str
    cache_volume: str
    # The node agent's socket for the sidecar, and the FUSE mount it makes for it.
    agent_volume: str
    status_annotation: str

    @property
    def volumes(self) -> tuple[str, ...]:
        """Our volume names, in the order the volumes step adds them.

        Every one is an emptyDir: whatever the node agent mounts for the pod
        (the models, the node cache, its socket) it mounts onto these from the
        host side, so a tenant pod names no host path at all.
        """
        return (self.mount_dir_volume, self.cache_volume, self.agent_volume)

    @property
    def sidecar_only_volumes(self) -> tuple[str, ...]:
        """Volumes no container but our sidecar may mount.

        The cache (node-wide in node mode), and the agent volume: its socket
        asks the node agent for this pod's mount and readiness condition.
        """
        return (self.cache_volume, self.agent_volume)


def owned_names(config: InjectorConfig) -> Owned:
    names = config.volumes
    return Owned(
        container=config.sidecar.container_name,
        mount_dir_volume=names.mount_dir_name,
        cache_volume=names.cache_name,
        agent_volume=names.agent_name,
        status_annotation=config.annotations.status,
    )
