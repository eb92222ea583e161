"""The agent's loop: every pass, hold the node cache to what the node's Bentos need.

A pass reads the Node's record (the `warm-models` annotation), the Bentos
the opted-in workloads want (newest change first), and then, one Bento at a
time: evicts what no workload has wanted for the grace period, and warms
each wanted Bento that is not warm yet, within the budget (making room by
evicting unreferenced Bentos only). After each change of state it writes
the record and the warm labels to its Node, so the scheduler (through the
injector's preferred affinity) and `kubectl describe node` see it at once.

Level-based, from the API's current state each pass: a restarted agent reads
its record back, finds a Bento still "warming", and warms it again, which
reads what is on the disk already and fetches only the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import structlog

from common.diskspace import disk_space
from common.warm import (
    STARTUP_TAINT,
    WARM_ANNOTATION,
    BentoRef,
    NodeWarmth,
    WarmRecord,
    WarmState,
    is_warm_label,
)
from injector.config import InjectorConfig
from modelstore.localcopy import LocalCopy
from modelstore.mount import MountError
from modelstore.sources import byte_sources
from modelstore.streamer import CopyWriteError, Progress, VerificationError, WarmupTimeout
from nodeagent.kube import API_ERRORS
from nodeagent.metrics import AgentMetrics
from nodeagent.plan import (
    DISK_MARGIN,
    FORGET_AFTER_SECONDS,
    HOLDING,
    covers,
    disk_budget,
    expired,
    forgettable,
    format_time,
    make_room,
    needs_warming,
    ready_since,
    retry_due,
    startup_settled,
    taint_index,
    track_unreferenced,
)
from nodeagent.warmer import (
    MIB,
    AgentIdentity,
    CredentialsError,
    MountedBento,
    copy_of,
    kept_copy,
    local_copy,
    mount_spec,
    mounted,
    node_cache_size_mib,
    read_credentials,
    wanted_files,
)
from nodeagent.workloads import WantedBento, Workload, recorded_bento, serving, wanted_bentos

log = structlog.get_logger("nodeagent")

NORMAL, WARNING = "Normal", "Warning"


@dataclass(frozen=True)
class AgentOptions:
    credentials_dir: Path
    work_dir: Path
    juicefs_bin: str = "juicefs"
    resync_seconds: float = 10.0
    # How long a Bento no workload uses stays in the cache when nothing needs its room.
    evict_after_seconds: float = 3600.0
    # How long a failed or over-budget Bento waits before the next try.
    retry_seconds: float = 60.0
    # How long a workload scaled to zero still wants its Bento held.
    scaled_to_zero_grace_seconds: float = 3600.0
    # The share of the node cache's disk kept free (nodeagent.plan.DISK_MARGIN).
    disk_margin: float = DISK_MARGIN
    # Warm the Bentos of the opted-in workloads before their pods arrive. Off:
    # no workload is listed or watched; a Bento is warmed only when a pod on
    # this node asks for its seal (tests that measure cold nodes; clusters that
    # would rather not pay the egress ahead of time).
    prewarm: bool = True
    # How long after the node turned Ready the startup taint stays while its
    # Bentos are not warm: a store that is down must not close a pool for good.
    startup_taint_timeout_seconds: float = 600.0


class NodeApi(Protocol):
    """What the agent needs of the Kubernetes API (nodeagent.kube.AgentApi in a cluster)."""

    async def node(self) -> dict[str, Any]: ...

    async def workloads(self, config: InjectorConfig, node: Mapping[str, Any]) -> list[Workload]:
        """The node-cache Bento workloads of opted-in namespaces that may run on node."""
        ...

    async def record(
        self, current_labels: Mapping[str, str], wanted_labels: Mapping[str, str], record: str
    ) -> None: ...

    async def event(self, kind: str, reason: str, message: str) -> None: ...

    async def remove_taint(self, index: int, key: str) -> None:
        """Remove the node's index-th taint, if its key is still `key` (else an API error)."""
        ...

    async def watch_workloads(self, changed: Callable[[], None]) -> None: ...


# After a workload change wakes the loop, how long to let more changes gather
# (a `helm upgrade` changes several Deployments within a moment).
SETTLE_SECONDS = 1.0


@dataclass
class NodeAgent:
    config: InjectorConfig
    options: AgentOptions
    identity: AgentIdentity
    api: NodeApi
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    metrics: AgentMetrics = field(default_factory=AgentMetrics)
    warmth: NodeWarmth = field(default_factory=NodeWarmth)
    unreferenced_since: dict[BentoRef, dt.datetime] = field(default_factory=dict)
    # The Bentos of the pods on this node that read the node cache (PodMounts):
    # referenced, so never evicted while such a pod runs.
    pod_bentos: Callable[[], set[BentoRef]] = set
    _node_labels: dict[str, str] = field(default_factory=dict)
    _referenced: set[BentoRef] = field(default_factory=set)
    # One change to the node cache at a time: the loop's and the pods' seals.
    _cache: asyncio.Lock = field(default_factory=asyncio.Lock)

    # Why the budget is below the configured one, as last said (None: it is not).
    _capped: str | None = None
    _budget: int | None = None
    # Said once per agent start: the node's Bentos are warm (or given up on).
    _settled: bool = False

    @property
    def configured_budget(self) -> int:
        """JuiceFS's own limit for the node cache: the node budget times the fill ratio."""
        return node_cache_size_mib(self.config) * MIB

    @property
    def budget(self) -> int:
        """What the Bentos held together may take: the configured budget, held to the disk."""
        return self.configured_budget if self._budget is None else self._budget

    async def _measure_budget(self) -> None:
        """The budget against the cache disk (statfs); NodeBudgetCapped once it becomes capped."""
        path = self.config.node_cache_path
        disk = None if path is None else await asyncio.to_thread(disk_space, Path(path), False)
        held = sum(r.bytes for r in self.warmth.records.values() if r.state in HOLDING)
        budget = disk_budget(self.configured_budget, disk, held, self.options.disk_margin)
        self._budget = budget.bytes
        if budget.capped is not None and self._capped is None:
            log.warning("budget.capped", budget_bytes=budget.bytes, why=budget.capped)
            await self.api.event(WARNING, "NodeBudgetCapped", budget.capped)
        self._capped = budget.capped

    async def run_forever(self) -> None:
        log.info(
            "agent.started",
            node=self.identity.node_name,
            budget_bytes=self.budget,
            node_cache=self.config.node_cache_path,
        )
        changed = asyncio.Event()
        # Without prewarm no workload is listed, so none is watched either.
        watcher = (
            asyncio.create_task(self.api.watch_workloads(changed.set))
            if self.options.prewarm
            else None
        )
        try:
            while True:
                changed.clear()
                try:
                    await self.reconcile()
                    log.debug("agent.pass_done")
                except API_ERRORS as err:
                    log.warning("agent.pass_failed", error=str(err) or type(err).__name__)
                if await woken(changed, self.options.resync_seconds):
                    log.debug("agent.woken", reason="a workload changed")
                    await asyncio.sleep(SETTLE_SECONDS)
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    async def reconcile(self) -> None:
        node = await self.api.node()
        meta = node.get("metadata") or {}
        self._node_labels = dict(meta.get("labels") or {})
        self.warmth = NodeWarmth.parse((meta.get("annotations") or {}).get(WARM_ANNOTATION))
        self.metrics.observe(self.warmth)
        await self._measure_budget()
        self.metrics.budget_bytes.set(self.budget)
        workloads = await self.api.workloads(self.config, node) if self.options.prewarm else []
        now = self.clock()
        wanted = wanted_bentos(serving(workloads, now, self.options.scaled_to_zero_grace_seconds))
        referenced = {w.bento for w in wanted} | self.pod_bentos()
        self._referenced = referenced
        self.unreferenced_since = track_unreferenced(
            self.unreferenced_since, self.warmth.records, referenced, now
        )
        for ref in expired(
            self.warmth.records, self.unreferenced_since, now, self.options.evict_after_seconds
        ):
            async with self._cache:
                await self.evict(
                    ref, f"no workload has used it for {self.options.evict_after_seconds:.0f}s"
                )
        gone = forgettable(self.warmth.records, referenced, now, FORGET_AFTER_SECONDS)
        if gone:
            await self._forget(gone)
        for want in wanted:
            record = self.warmth.records.get(want.bento)
            if not needs_warming(record, want.models) and await self._copy_recorded(want):
                continue
            if not retry_due(record, self.clock(), self.options.retry_seconds):
                continue
            async with self._cache:
                await self.warm(want, referenced)
        await self._settle(node, [w.bento for w in wanted])

    async def _settle(self, node: Mapping[str, Any], wanted: list[BentoRef]) -> None:
        """Once the Bentos deployed for the node are warm: say how long after the node
        turned Ready, and remove the startup taint if the node has it. Once per agent start."""
        if self._settled:
            return
        since = ready_since(node)
        if since is None:
            return  # not Ready (yet): nothing to time from
        waited = (self.clock() - since).total_seconds()
        settled = startup_settled(
            wanted,
            self.warmth.records,
            prewarm=self.options.prewarm,
            waited_seconds=waited,
            timeout_seconds=self.options.startup_taint_timeout_seconds,
        )
        if settled is None:
            return
        message = f"{settled.message}, {waited:.1f}s after the node turned Ready"
        index = taint_index(node, STARTUP_TAINT)
        if not settled.warm and index is None:
            # Long Ready before this agent started (a restart, an upgrade): no
            # taint to give up on, and no start of the node to time.
            self._settled = True
            log.info("node.settled", warm=False, seconds=round(waited, 2), taint=False)
            return
        if index is not None:
            await self.api.remove_taint(index, STARTUP_TAINT)
            message += f"; removed the startup taint {STARTUP_TAINT}"
        self._settled = True
        self.metrics.ready_to_warm.set(round(waited, 2))
        log.info(
            "node.settled", warm=settled.warm, seconds=round(waited, 2), taint=index is not None
        )
        if settled.warm:
            await self.api.event(NORMAL, "NodeWarm", message)
        else:
            await self.api.event(WARNING, "NodeWarmTimedOut", message)

    async def _write(self, record: WarmRecord) -> None:
        await self._put({**self.warmth.records, record.bento: record})

    async def _forget(self, gone: list[BentoRef]) -> None:
        """Drop the records of Bentos that hold nothing and that nothing uses any more."""
        log.info("record.forgotten", bentos=[str(ref) for ref in gone])
        await self._put({ref: r for ref, r in self.warmth.records.items() if ref not in gone})

    async def _put(self, records: dict[BentoRef, WarmRecord]) -> None:
        self.warmth = NodeWarmth(records)
        self.metrics.observe(self.warmth)
        wanted_labels = self.warmth.labels()
        await self.api.record(self._node_labels, wanted_labels, self.warmth.render())
        self._node_labels = {
            **{k: v for k, v in self._node_labels.items() if k not in _ours(self._node_labels)},
            **wanted_labels,
        }

    def _record(
        self,
        bento: BentoRef,
        state: WarmState,
        models: tuple[str, ...],
        size: int = 0,
        verified: bool = False,
        message: str = "",
    ) -> WarmRecord:
        return WarmRecord(
            bento=bento,
            state=state,
            bytes=size,
            verified=verified,
            at=format_time(self.clock()),
            models=models,
            message=message[:200],
        )

    def _mounted(
        self, want: WantedBento, blocks: bool = True
    ) -> AbstractAsyncContextManager[MountedBento]:
        """Mount want as a node-cache sidecar would on this node (CredentialsError); without
        blocks, a client that writes no node cache (a warm that keeps the local copy)."""
        credentials = read_credentials(
            self.options.credentials_dir / want.bento.volume, self.config
        )
        spec = mount_spec(
            self.config,
            want,
            credentials,
            self.options.work_dir,
            self.options.juicefs_bin,
            self.options.disk_margin,
            blocks,
        )
        return mounted(spec, want, self.config.warmup, self.metrics.relay)

    async def warm(self, want: WantedBento, referenced: set[BentoRef]) -> None:
        ref = want.bento
        # The Bento's bytes are kept once on the node: its copy, or its blocks.
        copy = kept_copy(self.config, want)
        try:
            async with self._mounted(want, blocks=copy is None) as bento:
                manifest = await asyncio.to_thread(bento.manifest)
                files = bento.files(manifest)
                size = sum(f.size for f in files)
                room = make_room(ref, size, self.warmth.records, referenced, self.budget)
                if not room.fits:
                    message = (
                        f"{size / MIB:.0f} MiB does not fit: the node budget is "
                        f"{self.budget / MIB:.0f} MiB and the Bentos that workloads still use "
                        f"hold {room.used / MIB:.0f} MiB"
                    )
                    await self._write(
                        self._record(ref, "over-budget", want.models, size, message=message)
                    )
                    self.metrics.outcomes.labels("over-budget").inc()
                    await self.api.event(WARNING, "ModelOverBudget", f"{ref}: {message}")
                    log.warning("warm.over_budget", bento=str(ref), bytes=size, used=room.used)
                    return
                for gone in room.evict:
                    await self.evict(gone, f"room for {ref}")
                await self._write(self._record(ref, "warming", want.models, size))
                await self.api.event(
                    NORMAL,
                    "ModelWarming",
                    f"{ref}: streaming {len(files)} files ({size / MIB:.0f} MiB) into "
                    f"{'a verified copy on the node' if copy else 'the node cache'} for "
                    f"{', '.join(want.workloads)}",
                )
                log.info("warm.started", bento=str(ref), bytes=size, files=len(files))
                counters = bento.counters()
                before = await counters.snapshot()
                progress = await bento.warm(
                    files, _log_progress(ref), _log_error(ref), copy, manifest
                )
                after = await counters.snapshot()
        except (CopyWriteError, CredentialsError, MountError, OSError, ValueError) as err:
            await self._failed(want, "WarmFailed", err, copy)
            return
        except VerificationError as err:
            await self._failed(want, "VerificationFailed", err, copy)
            return
        except WarmupTimeout as err:  # the sidecar's reason for the same
            await self._failed(want, "WarmupTimedOut", err, copy)
            return
        sources = byte_sources(progress.done_bytes, before, after)
        self.metrics.outcomes.labels("warm").inc()
        self.metrics.warmed_bytes.inc(progress.done_bytes)
        self.metrics.warm_seconds.inc(progress.elapsed)
        self.metrics.warm_duration.observe(progress.elapsed)
        if sources is not None:
            self.metrics.store_bytes.inc(sources.from_store)
        fetched = "" if sources is None else f"; {sources.describe('node')}"
        kept = "into a copy on the node's disk" if copy else "in the node cache"
        await self._write(self._record(ref, "warm", want.models, size, verified=True))
        await self.api.event(
            NORMAL,
            "ModelWarm",
            f"{ref}: {progress.done_bytes / MIB:.0f} MiB verified {kept} in "
            f"{progress.elapsed:.1f}s ({progress.mb_per_s:.1f} MB/s){fetched}",
        )
        log.info(
            "warm.done",
            bento=str(ref),
            bytes=progress.done_bytes,
            seconds=round(progress.elapsed, 2),
            from_store_bytes=None if sources is None else sources.from_store,
        )

    async def _failed(
        self, want: WantedBento, reason: str, err: BaseException, copy: LocalCopy | None = None
    ) -> None:
        message = str(err) or type(err).__name__
        if copy is not None:  # half written: its disk goes back
            await asyncio.to_thread(copy.remove)
        log.error("warm.failed", bento=str(want.bento), reason=reason, error=message)
        self.metrics.outcomes.labels(reason).inc()
        await self._write(self._record(want.bento, "failed", want.models, message=message))
        await self.api.event(WARNING, reason, f"{want.bento}: {message}")

    async def evict(self, ref: BentoRef, why: str) -> None:
        record = self.warmth.records[ref]
        target = recorded_bento(ref, record.models, self.config)
        try:
            async with self._mounted(target) as bento:
                files = bento.listed(await asyncio.to_thread(bento.manifest))
                await bento.evict(files)
            # Whatever the config says now: a copy kept before goes with the blocks.
            leftover = copy_of(self.config, ref)
            if leftover is not None:
                await asyncio.to_thread(leftover.remove)
        except (CredentialsError, MountError, OSError, ValueError) as err:
            log.error("evict.failed", bento=str(ref), error=str(err))
            self.metrics.outcomes.labels("EvictFailed").inc()
            await self.api.event(WARNING, "EvictFailed", f"{ref}: {err}")
            return
        await self._write(
            replace(self._record(ref, "evicted", record.models, message=why), bytes=0)
        )
        await self.api.event(
            NORMAL, "ModelEvicted", f"{ref}: {record.bytes / MIB:.0f} MiB removed ({why})"
        )
        self.metrics.outcomes.labels("evicted").inc()
        log.info("evict.done", bento=str(ref), bytes=record.bytes, why=why)

    async def _copy_recorded(self, want: WantedBento) -> bool:
        """Whether want's local copy is recorded, or none is kept (warm before the copies
        were, or with them turned off: warmed once more, to write one)."""
        copy = kept_copy(self.config, want)
        return copy is None or await asyncio.to_thread(copy.record_path.exists)

    def served_copy(self, ref: BentoRef, models: tuple[str, ...]) -> Path | None:
        """The models/ of ref's local copy, for a sealed pod that reads models; None: the FUSE
        mount's (blocking: it stats the copy's record).

        Only a copy of every model (what models/ holds in JuiceFS, nothing
        less) that the node's record says is warm and verified, and whose
        own record is written: a warm of more models under way removed it.
        """
        copy = local_copy(self.config, ref)
        record = self.warmth.records.get(ref)
        if copy is None or record is None or record.models or not covers(record, models):
            return None
        return copy.models_dir if copy.record_path.exists() else None

    async def seal(self, ref: BentoRef, models: tuple[str, ...]) -> str | None:
        """Make sure the node holds ref sealed for a pod that reads models; None when it does,
        else why not.

        Sealed: warmed and verified by this agent once per node (its record on
        the Node, which no tenant can write), and the pod's files on the
        node now: in its local copy (`_seal_copy`), or every block in the node
        cache (`juicefs warmup --check`); what is missing is fetched again
        once. A cold Bento is warmed here, on demand.
        Nothing is hashed again on a warm node.
        """
        want = recorded_bento(ref, models, self.config)
        async with self._cache:
            try:
                return await self._seal(ref, models, want)
            except (CredentialsError, MountError, OSError, ValueError, VerificationError) as err:
                return f"checking {ref} for this pod: {err}"

    async def _seal(self, ref: BentoRef, models: tuple[str, ...], want: WantedBento) -> str | None:
        if not covers(self.warmth.records.get(ref), models):
            if models:
                # The pod's selection is checked against the manifest first: a tenant
                # naming a model the Bento lacks must not touch the node's record of it.
                # (A pod of every model names none: its cold start mounts once, to warm.)
                async with self._mounted(want) as bento:
                    bento.files(await asyncio.to_thread(bento.manifest))
            await self.warm(want, self._referenced | {ref})
        record = self.warmth.records.get(ref)
        if not covers(record, models):
            return f"the node agent could not warm {ref} ({_described(record)})"
        if record is not None:
            whole = recorded_bento(ref, record.models, self.config)
            copy = kept_copy(self.config, whole)
            if copy is not None:
                return await self._seal_copy(ref, want, whole, copy)
        for attempt in (1, 2):
            async with self._mounted(want) as bento:
                files = bento.files(await asyncio.to_thread(bento.manifest))
                check = await bento.cached(files)
                if check is not None and check.complete:
                    log.info("seal.ok", bento=str(ref), cached=check.describe())
                    return None
                if attempt == 2:
                    held = "unknown" if check is None else check.describe()
                    return f"the node cache holds {held} of {ref} after refilling it"
                log.info("seal.refill", bento=str(ref), cached=check and check.describe())
                await bento.mount.fill_cache([bento.mount.models_dir / f.path for f in files])
        return None

    async def _seal_copy(
        self, ref: BentoRef, want: WantedBento, whole: WantedBento, copy: LocalCopy
    ) -> str | None:
        """Sealed from ref's local copy, the node's one copy of a Bento warm with every model:
        each of the pod's files recorded and on disk as the manifest says. A copy found
        short (a file gone or changed on the node's disk) is warmed again, once.

        The manifest is the one the copy was proved against, kept beside it:
        no JuiceFS mount on a warm node's seal (a copy kept without one, by an
        older agent, has JuiceFS's read through a mount).
        """
        for attempt in (1, 2):
            manifest = await asyncio.to_thread(copy.manifest)
            if manifest is None:
                async with self._mounted(want) as bento:
                    manifest = await asyncio.to_thread(bento.manifest)
            files = wanted_files(want, manifest)
            if await asyncio.to_thread(copy.covers, files):
                log.info("seal.ok", bento=str(ref), copy=str(copy.root))
                return None
            if attempt == 2:
                return f"the node's copy of {ref} is short of the manifest after warming it again"
            log.info("seal.rewarm", bento=str(ref), copy=str(copy.root))
            await self.warm(whole, self._referenced | {ref})
            record = self.warmth.records.get(ref)
            if not covers(record, want.models):
                return f"the node agent could not warm {ref} again ({_described(record)})"
        return None


async def woken(changed: asyncio.Event, seconds: float) -> bool:
    """Wait for changed, at most `seconds`; whether it was set."""
    try:
        async with asyncio.timeout(seconds):
            await changed.wait()
    except TimeoutError:
        return False
    return True


def _described(record: WarmRecord | None) -> str:
    """A record's state and message, for a refusal that says why."""
    return "nothing" if record is None else f"{record.state}: {record.message}"


def _ours(labels: dict[str, str]) -> set[str]:
    return {key for key in labels if is_warm_label(key)}


def _log_progress(ref: BentoRef) -> Callable[[Progress], None]:
    last = [0.0]

    def on_progress(progress: Progress) -> None:
        if progress.elapsed - last[0] >= 5 or progress.fraction >= 1:
            last[0] = progress.elapsed
            log.info("warm.progress", bento=str(ref), progress=progress.describe())

    return on_progress


def _log_error(ref: BentoRef) -> Callable[[Progress, OSError], None]:
    def on_error(progress: Progress, err: OSError) -> None:
        log.warning("warm.read_failed", bento=str(ref), error=str(err))

    return on_error
