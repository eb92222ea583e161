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
    # Only when the sidecar cannot share the token volume the pod already has.
    token_volume: str
    # Only for the unprivileged sidecar: the node agent's socket and mount.
    agent_volume: str
    status_annotation: str
    # The privileged sidecar reads the node cache through a hostPath; the
    # unprivileged one through an emptyDir the node agent bind-mounts it onto.
    node_cache_host_path: bool

    @property
    def volumes(self) -> tuple[str, ...]:
        """Our volume names, in the order the volumes step adds them.

        Every name is reserved whichever sidecar the config chooses, so a pod's
        own volume never takes a name that a change of the flag would give us.
        """
        return (self.mount_dir_volume, self.cache_volume, self.token_volume, self.agent_volume)

    @property
    def volume_sources(self) -> dict[str, tuple[str, ...]]:
        """The volume source each of our volumes may have, whoever wrote it.

        A hostPath is only ever the node cache of the privileged sidecar, and
        then exactly the one the config names for the pod's JuiceFS volume
        (checked in conflicts.py).
        """
        cache = ("emptyDir", "hostPath") if self.node_cache_host_path else ("emptyDir",)
        return {
            self.mount_dir_volume: ("emptyDir",),
            self.cache_volume: cache,
            self.token_volume: ("projected",),
            self.agent_volume: ("emptyDir",),
        }

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
        token_volume=names.token_name,
        agent_volume=names.agent_name,
        status_annotation=config.annotations.status,
        node_cache_host_path=not config.sidecar.unprivileged,
    )
