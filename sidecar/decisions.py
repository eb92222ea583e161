"""The sidecar's decisions, as pure functions of what it was told and what it measured.

`sidecar.run` gathers the inputs (settings, the cache probe) and carries the
decisions out; nothing here does I/O.

The rule that holds whatever is decided: the gate never opens on bytes that
were not verified against the manifest, unless the pod's owner turned
warmup off (annotation), in which case it opens once the mount answers and
says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.env import SsdPolicy
from sidecar.cacheprobe import CacheSpeed


def should_probe_cache(policy: SsdPolicy) -> bool:
    """Measure the cache disk only when the pod asked for local SSD at all."""
    return policy != "off"


@dataclass(frozen=True)
class CachePlan:
    # JuiceFS --cache-size; 0 mounts without a disk cache.
    cache_size_mib: int
    # The disk measured below the minimum: say so (SlowCacheDisk).
    slow: bool = False

    @property
    def disk_cache(self) -> bool:
        return self.cache_size_mib > 0


def cache_plan(
    policy: SsdPolicy, speed: CacheSpeed | None, minimum_mbps: float, cache_size_mib: int
) -> CachePlan:
    """What to do with the cache disk, given the pod's SSD policy and the measurement.

    A disk slower than the object store makes cache hits slower than misses:
    with `required` the mount goes without a disk cache; with `preferred` it
    keeps the slow cache (the pod accepted non-SSD nodes). Unmeasured
    (`off`) or fast enough: keep the cache as configured.
    """
    if speed is None or not speed.slower_than(minimum_mbps):
        return CachePlan(cache_size_mib)
    if policy == "required":
        return CachePlan(0, slow=True)
    return CachePlan(cache_size_mib, slow=True)


def slow_disk_action(plan: CachePlan) -> str:
    """How the SlowCacheDisk Event ends: what the sidecar does about it."""
    if plan.disk_cache:
        return "continuing with it"
    return (
        "mounting without a disk cache; the model is still streamed and verified before the "
        "gate opens"
    )


@dataclass(frozen=True)
class GatePlan:
    # Stream the model and check every file against the manifest first.
    verify: bool
    # The condition's reason and message once it is set to True.
    reason: str
    message: str


def gate_plan(warmup: bool, cache: CachePlan) -> GatePlan:
    """When the readiness gate may open, and what the condition will say.

    The cache decision never weakens this: without a disk cache the model
    is still streamed and verified (the bytes are proven, just not kept).
    Only the pod owner's warmup=false opens the gate on a mount alone.
    """
    if not warmup:
        return GatePlan(verify=False, reason="Mounted", message="mounted; warmup disabled")
    if not cache.disk_cache:
        return GatePlan(
            verify=True,
            reason="ModelsVerified",
            message="model streamed and verified; no disk cache (the cache disk is too slow)",
        )
    return GatePlan(
        verify=True,
        reason="ModelsCached",
        message="model streamed into the local cache and verified",
    )
