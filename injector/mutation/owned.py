"""What the injector owns in a pod: one list, read by every step and every check.

A pod's own container or volume with one of these names clashes with ours;
a pod that claims (by the status annotation) to be injected must have these
exactly as the injector makes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from injector.config import InjectorConfig

# The volume source each of our volumes has, whoever wrote it.
VOLUME_SOURCES = ("emptyDir", "projected")


@dataclass(frozen=True)
class Owned:
    container: str
    mount_dir_volume: str
    cache_volume: str
    # Only when the sidecar cannot share the token volume the pod already has.
    token_volume: str
    status_annotation: str

    @property
    def volumes(self) -> tuple[str, ...]:
        """Our volume names, in the order the volumes step adds them."""
        return (self.mount_dir_volume, self.cache_volume, self.token_volume)


def owned_names(config: InjectorConfig) -> Owned:
    names = config.volumes
    return Owned(
        container=config.sidecar.container_name,
        mount_dir_volume=names.mount_dir_name,
        cache_volume=names.cache_name,
        token_volume=names.token_name,
        status_annotation=config.annotations.status,
    )
