"""What the agent does with its node cache: pure decisions over its record and the budget."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from common.diskspace import DiskSpace
from common.warm import BentoRef, WarmRecord

MIB = 1 << 20

# States whose bytes are (or are being put) in the node cache.
HOLDING = ("warm", "warming")


@dataclass(frozen=True)
class Room:
    """Whether a Bento of some size fits, and which unreferenced Bentos go to make it fit."""

    fits: bool
    evict: tuple[BentoRef, ...]
    # Bytes the other Bentos would hold, after the evictions.
    used: int


def make_room(
    bento: BentoRef,
    size: int,
    records: Mapping[BentoRef, WarmRecord],
    referenced: Collection[BentoRef],
    budget: int,
) -> Room:
    """Fit `size` bytes of bento within budget, evicting only Bentos no workload references.

    Least recently warmed first. A Bento some workload still uses is never
    evicted for another: then the newcomer does not fit (the agent warms the
    newest first, so what is held is what is newer).
    """
    holding = {
        ref: record for ref, record in records.items() if ref != bento and record.state in HOLDING
    }
    used = sum(record.bytes for record in holding.values())
    if used + size <= budget:
        return Room(True, (), used)
    unreferenced = sorted(
        (record for ref, record in holding.items() if ref not in referenced),
        key=lambda record: (record.at, record.bento),
    )
    evict: list[BentoRef] = []
    left = used
    for record in unreferenced:
        if left + size <= budget:
            break
        evict.append(record.bento)
        left -= record.bytes
    if left + size <= budget:
        return Room(True, tuple(evict), left)
    return Room(False, (), used)


# The share of the node cache's disk the agent leaves free. The kubelet's
# hard eviction starts at nodefs.available < 10% (its default, on GKE's
# local SSD as elsewhere), and JuiceFS's own floor (--free-space-ratio) is
# 10% too: a node cache filled to JuiceFS's floor puts the disk at the
# kubelet's threshold, and it evicts unrelated pods. 20% keeps the kubelet's
# 10% and as much again for what the node's other pods write meanwhile; the
# agent's JuiceFS mounts get it as their --free-space-ratio too.
DISK_MARGIN = 0.2


@dataclass(frozen=True)
class Budget:
    """What the Bentos held together may take, and why less than configured (None: not)."""

    bytes: int
    capped: str | None = None


def disk_budget(
    configured: int, disk: DiskSpace | None, held: int, margin: float = DISK_MARGIN
) -> Budget:
    """The configured budget, held to what the disk gives while `margin` of it stays free.

    The cache may grow into what is free now beyond the margin, on top of
    what it already holds. Unknown (statfs failed): the configured budget.
    """
    if disk is None or disk.total_bytes <= 0:
        return Budget(configured)
    room = max(disk.free_bytes + held - int(margin * disk.total_bytes), 0)
    if room >= configured:
        return Budget(configured)
    return Budget(
        room,
        f"the node budget ({configured / MIB:.0f} MiB) is held to {room / MIB:.0f} MiB: the "
        f"cache disk has {disk.describe()}, and {margin:.0%} of it stays free, above "
        "the kubelet's eviction threshold (nodefs.available 10%)",
    )


def expired(
    records: Mapping[BentoRef, WarmRecord],
    unreferenced_since: Mapping[BentoRef, dt.datetime],
    now: dt.datetime,
    grace_seconds: float,
) -> list[BentoRef]:
    """Held Bentos that no workload has referenced for grace_seconds.

    unreferenced_since is when the agent first saw each Bento without a
    workload (kept in memory: a restarted agent waits the grace again).
    """
    return [
        ref
        for ref, record in sorted(records.items())
        if record.state in HOLDING
        and ref in unreferenced_since
        and (now - unreferenced_since[ref]).total_seconds() >= grace_seconds
    ]


def track_unreferenced(
    previous: Mapping[BentoRef, dt.datetime],
    records: Collection[BentoRef],
    referenced: Collection[BentoRef],
    now: dt.datetime,
) -> dict[BentoRef, dt.datetime]:
    """Since when each recorded Bento has had no workload (the earliest sighting stays)."""
    return {ref: previous.get(ref, now) for ref in records if ref not in referenced}


# How long the record of a Bento that holds nothing and that nothing uses
# stays on the Node after its last change (what `kubectl describe node`
# shows of an eviction or a failure, for an hour).
FORGET_AFTER_SECONDS = 3600.0

# At most this many records on the Node (the annotation's size is bounded:
# 256 KiB for all of a Node's annotations together; a record is ~0.4 KiB).
MAX_RECORDS = 64


def forgettable(
    records: Mapping[BentoRef, WarmRecord],
    referenced: Collection[BentoRef],
    now: dt.datetime,
    grace_seconds: float,
    max_records: int = MAX_RECORDS,
) -> list[BentoRef]:
    """Records the Node no longer needs, so the record never grows without bound.

    Only Bentos that hold nothing (evicted, failed, over-budget) and that no
    workload or pod references: those whose state last changed grace_seconds
    ago or more, then, past max_records, the oldest of the rest. A held or
    referenced Bento always keeps its record (its seal, its retry timer).
    """
    idle = sorted(
        (r for ref, r in records.items() if r.state not in HOLDING and ref not in referenced),
        key=lambda record: (record.at, record.bento),
    )
    old = {
        record.bento
        for record in idle
        if (since := parse_time(record.at)) is None
        or (now - since).total_seconds() >= grace_seconds
    }
    over = len(records) - len(old) - max_records
    rest = [record.bento for record in idle if record.bento not in old]
    return sorted(old | set(rest[: max(over, 0)]))


def needs_warming(record: WarmRecord | None, models: tuple[str, ...]) -> bool:
    """Not yet warm and verified with exactly these models (a restart resumes "warming")."""
    return record is None or not (
        record.state == "warm" and record.verified and record.models == models
    )


def covers(record: WarmRecord | None, models: tuple[str, ...]) -> bool:
    """Whether the node's seal of a Bento covers a pod that reads `models` (empty: all).

    Sealed: warm and verified by the agent. A record of all the models covers
    any selection; a record of some covers a pod that reads only those.
    """
    if record is None or record.state != "warm" or not record.verified:
        return False
    return not record.models or (bool(models) and set(models) <= set(record.models))


def retry_due(record: WarmRecord | None, now: dt.datetime, retry_seconds: float) -> bool:
    """A failed or over-budget Bento is tried again only after retry_seconds."""
    if record is None or record.state not in ("failed", "over-budget"):
        return True
    since = parse_time(record.at)
    return since is None or (now - since).total_seconds() >= retry_seconds


def format_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def spec_changed(event: str, seen: int | None, generation: int | None) -> bool:
    """Whether a watch event on a Deployment or StatefulSet may change what the node should
    hold: one added or deleted, or given a new spec (its generation moves). Status updates,
    which a rollout makes many of (replica counts), leave the generation alone."""
    if event in ("ADDED", "DELETED"):
        return True
    return event == "MODIFIED" and generation != seen


def ready_since(node: Mapping[str, object]) -> dt.datetime | None:
    """When the node last turned Ready (its Ready condition's transition), if it is Ready."""
    status = node.get("status")
    conditions = status.get("conditions") if isinstance(status, Mapping) else None
    for condition in conditions if isinstance(conditions, list) else []:
        if isinstance(condition, Mapping) and condition.get("type") == "Ready":
            if condition.get("status") != "True":
                return None
            return parse_timestamp(condition.get("lastTransitionTime"))
    return None


def parse_timestamp(value: object) -> dt.datetime | None:
    """A Kubernetes timestamp as the API sends it (2026-12-07T23:11:18Z) or as the
    client serializes its datetimes (2026-12-07T23:11:18+00:00); None otherwise."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo is not None else None
    try:
        moment = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def taint_index(node: Mapping[str, object], key: str) -> int | None:
    """Where in the node's taints the (first) one with `key` is, or None."""
    spec = node.get("spec")
    taints = spec.get("taints") if isinstance(spec, Mapping) else None
    for index, taint in enumerate(taints if isinstance(taints, list) else []):
        if isinstance(taint, Mapping) and taint.get("key") == key:
            return index
    return None


@dataclass(frozen=True)
class Settled:
    """The node's Bentos are as warm as its start will make them: what to say, and how."""

    message: str
    # Every wanted Bento warm (or without room); False: given up waiting.
    warm: bool


def startup_settled(
    wanted: Collection[BentoRef],
    records: Mapping[BentoRef, WarmRecord],
    *,
    prewarm: bool,
    waited_seconds: float,
    timeout_seconds: float,
) -> Settled | None:
    """Whether the node is done warming what is deployed for it (the startup taint may go),
    or None while it is still at it.

    Done when every wanted Bento is warm, or recorded over-budget (no room will
    appear by waiting); when prewarm is off (nothing is warmed before pods ask);
    or, not warm, once timeout_seconds have passed since the node turned Ready, so
    that a store that is down cannot keep a pool's nodes closed for good.
    """
    if not prewarm:
        return Settled("prewarm is off: Bentos are warmed when their pods ask", warm=True)
    if not wanted:
        return Settled("no Bento is deployed for this node", warm=True)
    states = {ref: records[ref].state if ref in records else "missing" for ref in wanted}
    warm = sorted(str(ref) for ref, state in states.items() if state == "warm")
    no_room = sorted(str(ref) for ref, state in states.items() if state == "over-budget")
    rest = sorted(str(ref) for ref in wanted if states[ref] not in ("warm", "over-budget"))
    if not rest:
        said = f"{len(warm)} Bento{'' if len(warm) == 1 else 's'} warm"
        if no_room:
            said += f", {len(no_room)} without room in the node budget ({', '.join(no_room)})"
        return Settled(said, warm=True)
    if waited_seconds >= timeout_seconds:
        return Settled(
            f"{len(rest)} of {len(wanted)} Bentos not warm after {timeout_seconds:.0f}s: "
            + ", ".join(rest),
            warm=False,
        )
    return None
