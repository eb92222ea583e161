"""The sidecar's decisions, as pure functions of what it was told and what it measured.

`sidecar.run` gathers the inputs (settings, the cache disk measured) and carries the
decisions out; nothing here does I/O.

The rule that holds whatever is decided: the gate never opens on bytes that
were not verified against the manifest, unless the pod's owner turned
warmup off (annotation), in which case it opens once the mount answers and
says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.diskspace import DiskSpace
from common.env import SsdPolicy, seals_before_mount
from sidecar.cachedisk import MIB, CacheSpeed

# `juicefs mount --free-space-ratio` (left at its default): below this share
# of free space (or inodes) on the cache disk, JuiceFS caches nothing more
# (and evicts what it can); reads then come from the object store.
JUICEFS_FREE_RATIO = 0.1


def should_measure_cache(policy: SsdPolicy, full: bool = False) -> bool:
    """Measure the cache disk only when the pod asked for local SSD, and it has room to."""
    return policy != "off" and not full


def cache_full(space: DiskSpace | None, free_ratio: float = JUICEFS_FREE_RATIO) -> bool:
    """The disk is too full for JuiceFS to cache: under half its free ratio of space or inodes.

    Between the ratio and half of it JuiceFS evicts its own blocks to make
    room (a cache at its limit, which still works); under half it stops
    writing even staged blocks, as here: what fills the disk is not its to
    evict. Unknown (statfs failed) is not full: JuiceFS itself says so if it is.
    """
    if space is None or space.total_bytes <= 0:
        return False
    floor = free_ratio / 2
    if space.free_bytes < floor * space.total_bytes:
        return True
    return space.total_inodes > 0 and space.free_inodes < floor * space.total_inodes


def cache_full_message(
    directory: str,
    space: DiskSpace | None,
    juicefs_line: str | None,
    free_ratio: float = JUICEFS_FREE_RATIO,
) -> str:
    """The CacheDiskFull Event: what is full, and what the pod does about it."""
    if space is not None and space.total_bytes > 0:
        what = (
            f"cache dir {directory}: {space.describe()} "
            f"({space.free_bytes / space.total_bytes:.0%} free; JuiceFS keeps {free_ratio:.0%} "
            f"({free_ratio * space.total_bytes / MIB:.0f} MiB) free and writes no block below "
            f"{free_ratio / 2:.0%})"
        )
    else:
        what = f"cache dir {directory}: free space unknown"
    said = f"; juicefs: {juicefs_line.strip()[-300:]}" if juicefs_line else ""
    return (
        f"{what}{said}. The model is read from the object store where it cannot be cached "
        "(slower, and fetched again by the next pod); it is still streamed and verified "
        "against the manifest before the gate opens"
    )


def cache_keeps(model_bytes: int, cache_size_mib: int) -> bool:
    """Whether the cache can hold the whole model.

    JuiceFS evicts past its --cache-size, so a larger model is never all
    local: a fill would fetch what the reads evicted, evict more, and end
    short after its rounds, having fetched the model several times over.
    """
    return model_bytes <= cache_size_mib * MIB


def cache_too_small_message(model_bytes: int, cache_size_mib: int) -> str:
    return (
        f"the model ({model_bytes / MIB:.0f} MiB) is larger than this pod's cache "
        f"({cache_size_mib} MiB): every byte is still verified as it streams, but the cache "
        "cannot keep it, so it is not filled and each start reads what was evicted from the "
        "object store; give the pod a larger cache (juicefs.bentoml.com/cache-size)"
    )


def should_fill_cache(disk_cache: bool, full: bool) -> bool:
    """Complete the cache after verifying (juicefs warmup) only where it can hold the blocks.

    On a full disk the fill would fetch the whole model from the store once
    more, only for JuiceFS to fail writing it.
    """
    return disk_cache and not full


@dataclass(frozen=True)
class CachePlan:
    # JuiceFS --cache-size; 0 mounts without a disk cache.
    cache_size_mib: int
    # The disk measured below the minimum: say so (SlowCacheDisk).
    slow: bool = False
    # The disk is full (JuiceFS will cache nothing): say so (CacheDiskFull).
    full: bool = False

    @property
    def disk_cache(self) -> bool:
        return self.cache_size_mib > 0


def cache_plan(
    policy: SsdPolicy,
    speed: CacheSpeed | None,
    minimum_mbps: float,
    cache_size_mib: int,
    full: bool = False,
) -> CachePlan:
    """What to do with the cache disk, given the pod's SSD policy and the measurement.

    A disk slower than the object store makes cache hits slower than misses:
    with `required` the mount goes without a disk cache; with `preferred` it
    keeps the slow cache (the pod accepted non-SSD nodes). Unmeasured
    (`off`) or fast enough: keep the cache as configured. A full disk
    (unmeasured: no room to) keeps its cache too: what is cached there (the
    node cache of a warm node) still serves, and JuiceFS reads the rest from
    the object store.
    """
    if full:
        return CachePlan(cache_size_mib, full=cache_size_mib > 0)
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


def seal_before_mount(lent: bool, gate: GatePlan) -> bool:
    """Whether this sidecar asks the node agent to seal before it mounts JuiceFS: on a
    node cache the agent lends, when the gate verifies (common.env.seals_before_mount)."""
    return seals_before_mount(lent, gate.verify)


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
    if cache.full:
        return _verified_on_a_full_disk()
    return GatePlan(
        verify=True,
        reason="ModelsCached",
        message="model streamed into the local cache and verified",
    )


def gate_unsealed(gate: GatePlan, cache_full_seen: bool) -> GatePlan:
    """Node cache mode, when the node agent could not seal the Bento: this pod verifies it.

    The node cache stays the agent's alone (this sidecar only reads it), so
    whatever it lacks is read from the object store; the gate still opens
    only on every byte verified against the manifest, never on the refusal.
    A full cache disk (the usual reason) is said as such.
    """
    if not gate.verify:
        return gate
    if cache_full_seen:
        return _verified_on_a_full_disk()
    return GatePlan(
        verify=True,
        reason="ModelsVerified",
        message="model streamed and verified by this pod; the node agent could not seal it in "
        "the node cache, so what the cache lacks is read from the object store",
    )


def _verified_on_a_full_disk() -> GatePlan:
    return GatePlan(
        verify=True,
        reason="ModelsVerified",
        message="model streamed and verified; the cache disk is full, so what it could not "
        "cache is read from the object store",
    )


def gate_after_warmup(
    gate: GatePlan, cache_full_seen: bool, cache_too_small: bool = False
) -> GatePlan:
    """The gate plan once the model is verified: a disk found full meanwhile is said, and a
    model larger than the cache.

    It never drops the verification: only the reason and message change
    (ModelsCached would claim a local copy the disk could not hold).
    """
    if not gate.verify or gate.reason != "ModelsCached":
        return gate
    if cache_full_seen:
        return _verified_on_a_full_disk()
    if cache_too_small:
        return GatePlan(
            verify=True,
            reason="ModelsVerified",
            message="model streamed and verified; it is larger than the cache, so what the "
            "cache cannot keep is read from the object store",
        )
    return gate
