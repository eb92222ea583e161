"""`python -m sidecar run`: probe the cache, mount, stream the model, open the gate.

Exit codes: 0 after SIGTERM (unmounted cleanly); 1 when the mount cannot be
made (or remade after the JuiceFS process died); 2 for a bad environment. A failed or timed
out warmup does not exit: the gate stays closed, an Event says why, and the
mount keeps serving (so the app can still start and report on its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from modelstore.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestFile,
    ManifestMismatch,
    bento_tag,
    files_to_verify,
    read_manifest,
)
from modelstore.mount import JuiceFSMount, MountError
from modelstore.sources import ByteSources, MountCounters, byte_sources
from modelstore.streamer import (
    MIB,
    BentoTree,
    CacheFiller,
    CachePurger,
    Progress,
    VerificationError,
    WarmupTimeout,
    fill_cache_until,
    stream_model,
)
from sidecar.agent import AgentChannel, AgentError, AgentMounts, AgentUnreachable
from sidecar.cachedisk import CacheSpeed, disk_space, measure
from sidecar.decisions import (
    GatePlan,
    cache_full,
    cache_full_message,
    cache_plan,
    gate_after_warmup,
    gate_plan,
    gate_unsealed,
    should_fill_cache,
    should_probe_cache,
    slow_disk_action,
)
from sidecar.env import Settings
from sidecar.metrics import MetricsEndpoint, SidecarMetrics
from sidecar.reporter import NORMAL, WARNING, OrderedReporter, Reporter

__all__ = [
    "NORMAL",
    "WARNING",
    "CacheSpaceWatch",
    "ProgressReporter",
    "open_gate",
    "run",
    "warm",
]

log = structlog.get_logger("sidecar")


@dataclass
class CacheSpaceWatch:
    """Says once (CacheDiskFull Event) when the cache disk is too full for JuiceFS to cache.

    Looks at the disk itself (statfs, JuiceFS's own free-ratio rule) and at
    what juicefs logged (`juicefs_lines`: its lines about a cache it could
    not write), before mounting and again once the model is verified.
    """

    directory: Path
    reporter: Reporter
    juicefs_lines: Callable[[], Sequence[str]] = lambda: ()
    full: bool = False
    reported: bool = False

    async def check(self, when: str, *, full: bool = False) -> bool:
        """Whether the disk is (or was found) full; the Event the first time. full: known so."""
        space = await asyncio.to_thread(disk_space, self.directory)
        said = list(self.juicefs_lines())
        if not (full or cache_full(space) or said):
            return self.full
        self.full = True
        log.warning(
            "cache.full",
            when=when,
            directory=str(self.directory),
            free_bytes=None if space is None else space.free_bytes,
            total_bytes=None if space is None else space.total_bytes,
            juicefs=said[-1] if said else None,
        )
        if not self.reported:
            self.reported = True
            message = cache_full_message(str(self.directory), space, said[-1] if said else None)
            await self.reporter.event(WARNING, "CacheDiskFull", f"{when}: {message}")
        return True


@dataclass
class ProgressReporter:
    """Logs progress every few seconds and sends an Event at most every event_every seconds."""

    reporter: Reporter
    log_every: float = 5.0
    event_every: float = 30.0
    stall_after: float = 30.0
    _last_log: float = 0.0
    _last_event: float = field(default_factory=time.monotonic)
    _stalled: bool = False
    _pending: set[asyncio.Task[None]] = field(default_factory=set)
    # The streamer's progress, once it has reported any (the stall watchdog reads it).
    current: Progress | None = None
    metrics: SidecarMetrics = field(default_factory=SidecarMetrics)

    def _send(self, kind: str, reason: str, message: str) -> None:
        task = asyncio.get_running_loop().create_task(self.reporter.event(kind, reason, message))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def on_progress(self, progress: Progress) -> None:
        self.current = progress
        self.metrics.stream_progressed(progress)
        now = time.monotonic()
        if self._stalled and now - progress.last_advance < 1:
            self._stalled = False
            self._send(NORMAL, "WarmupResumed", f"model streaming resumed: {progress.describe()}")
        if now - self._last_log >= self.log_every:
            self._last_log = now
            log.info(
                "warmup.progress",
                done_bytes=progress.done_bytes,
                total_bytes=progress.total_bytes,
                mb_per_s=round(progress.mb_per_s, 1),
                eta_seconds=None if progress.eta_seconds is None else round(progress.eta_seconds),
            )
        if now - self._last_event >= self.event_every:
            self._last_event = now
            self._send(
                NORMAL,
                "WarmupProgress",
                f"streaming model into the local cache: {progress.describe()}",
            )

    def on_error(self, progress: Progress, err: OSError) -> None:
        log.warning("warmup.read_failed", error=progress.last_error, retries=progress.retries)
        if not self._stalled:
            self._stalled = True
            self._send(
                WARNING,
                "WarmupStalled",
                f"reading the model failed ({progress.last_error}); the object store or metadata "
                f"engine may be unreachable; retrying with backoff. {progress.describe()}",
            )

    def on_purge(self, entry: ManifestFile, problem: str) -> None:
        self._send(
            WARNING,
            "CacheBlocksPurged",
            f"{problem}; evicting the file's cached blocks (a block in the cache may be "
            "corrupt) and reading it once more: a second mismatch fails verification",
        )

    async def watch_stalls(self) -> None:
        """A read that hangs (rather than fails) is noticed too."""
        while True:
            await asyncio.sleep(5)
            progress = self.current
            if progress is None:
                continue
            if not self._stalled and time.monotonic() - progress.last_advance > self.stall_after:
                self._stalled = True
                self._send(
                    WARNING,
                    "WarmupStalled",
                    f"no model bytes arrived for {self.stall_after:.0f}s; the object store may be "
                    f"unreachable. {progress.describe()}",
                )

    async def drain(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


async def wait_for_manifest(
    mount: BentoTree, reporter: Reporter, deadline: float, every: float = 5.0
) -> Manifest:
    """The publisher writes manifest.json last: a pod may start before it is there."""
    path = mount.bento_dir / MANIFEST_NAME
    told = False
    while not await asyncio.to_thread(path.exists):
        if time.monotonic() + every > deadline:
            raise FileNotFoundError(f"{path} did not appear before the warmup timeout")
        if not told:
            told = True
            await reporter.event(
                NORMAL,
                "WaitingForManifest",
                f"{MANIFEST_NAME} is not published yet for this Bento; checking every {every:.0f}s",
            )
        await asyncio.sleep(every)
    return await asyncio.to_thread(read_manifest, mount.bento_dir)


async def warm(
    settings: Settings,
    mount: BentoTree,
    reporter: Reporter,
    counters: MountCounters | None = None,
    filler: CacheFiller | None = None,
    cache_watch: CacheSpaceWatch | None = None,
    metrics: SidecarMetrics | None = None,
    purger: CachePurger | None = None,
) -> bool:
    """Stream and verify the model; True when the gate may open.

    The manifest must name this pod's Bento and have every model chosen
    (`files_to_verify`), or nothing is streamed and verification fails.

    With `filler`, the cache is then completed with any block the reads left
    out (juicefs drops cache writes when its disk queue is full), so the next
    pod on this node reads every byte locally. That costs only the missing
    blocks; if it fails the gate still opens: every byte is verified already.

    With `counters` (juicefs's metrics), the ModelsReady Event and the
    warmup.done log say how many of the verified bytes came from the cache
    and how many from the object store. A warm start verifies exactly as a
    cold one: every byte is read through the mount and hashed.

    With `cache_watch`, a cache disk found full once the model is verified
    is reported (CacheDiskFull) and not filled: the fill would only fetch
    the model again for JuiceFS to fail writing it.

    `metrics` records the stream (without it, a registry nobody serves).

    With `purger` (a client that may write its cache), a file whose bytes
    differ from the manifest has its cached blocks evicted and is read once
    more (a CacheBlocksPurged Event); only a second mismatch fails.
    """
    metrics = metrics or SidecarMetrics()
    deadline = time.monotonic() + settings.warmup_timeout_seconds
    manifest = await wait_for_manifest(mount, reporter, deadline)
    try:
        files = files_to_verify(
            manifest, bento_tag(settings.bento_name, settings.bento_version), settings.models
        )
    except ManifestMismatch as err:
        log.error("warmup.manifest_mismatch", error=str(err))
        metrics.warmup_failed("VerificationFailed")
        await reporter.event(
            WARNING, "VerificationFailed", f"the manifest cannot prove this pod's model: {err}"
        )
        await _best_effort(reporter.set_condition("False", "VerificationFailed", str(err)[:256]))
        return False
    total = sum(f.size for f in files)
    await reporter.event(
        NORMAL,
        "WarmupStarted",
        f"streaming {len(files)} files ({total / MIB:.0f} MiB) of {manifest.bento} into the "
        f"{settings.cache_mode} cache with {settings.warmup_concurrency} parallel reads",
    )
    metrics.stream_started(total)
    progress_reporter = ProgressReporter(reporter, metrics=metrics)
    before = None if counters is None else await counters.snapshot()
    watchdog = asyncio.create_task(progress_reporter.watch_stalls())
    try:
        progress = await stream_model(
            settings.warmup_concurrency,
            mount,
            files,
            deadline,
            on_progress=progress_reporter.on_progress,
            on_error=progress_reporter.on_error,
            purger=purger,
            on_purge=progress_reporter.on_purge,
        )
        full = cache_watch is not None and await cache_watch.check("after streaming the model")
        if filler is not None and should_fill_cache(True, full):
            await fill_cache_until(filler, [mount.models_dir / f.path for f in files], deadline)
    except VerificationError as err:
        log.error("warmup.verification_failed", error=str(err))
        metrics.warmup_failed("VerificationFailed")
        await reporter.event(
            WARNING, "VerificationFailed", f"model bytes do not match the manifest: {err}"
        )
        await _best_effort(reporter.set_condition("False", "VerificationFailed", str(err)[:256]))
        return False
    except WarmupTimeout as err:
        log.error("warmup.timeout", error=str(err))
        metrics.warmup_failed("WarmupTimedOut")
        await reporter.event(
            WARNING,
            "WarmupTimedOut",
            f"gave up after {settings.warmup_timeout_seconds}s: {err}",
        )
        await _best_effort(reporter.set_condition("False", "WarmupTimedOut", str(err)[:256]))
        return False
    finally:
        watchdog.cancel()
        await progress_reporter.drain()
    after = None if counters is None else await counters.snapshot()
    sources = byte_sources(progress.done_bytes, before, after)
    metrics.stream_verified(progress, sources)
    message = (
        f"model ready: {progress.done_bytes / MIB:.0f} MiB in {progress.elapsed:.1f}s "
        f"({progress.mb_per_s:.1f} MB/s), {progress.done_files} files verified"
    )
    if counters is not None:
        message += f"; {_sources_text(sources, settings)}"
    log.info(
        "warmup.done",
        bytes=progress.done_bytes,
        seconds=round(progress.elapsed, 2),
        mb_per_s=round(progress.mb_per_s, 1),
        cache_mode=settings.cache_mode,
        from_cache_bytes=None if sources is None else sources.from_cache,
        from_store_bytes=None if sources is None else sources.from_store,
        store_gets=None if sources is None else sources.store_gets,
        cache_hit_bytes=None if sources is None else sources.cache_hit_bytes,
    )
    await reporter.event(NORMAL, "ModelsReady", message)
    return True


def _cache_text(settings: Settings, cache_size_mib: int) -> str:
    if cache_size_mib == 0:
        return "none"
    if settings.cache_mode == "node" and settings.agent_socket is not None:
        return f"the node cache of volume {settings.volume}, read-only (the node agent writes it)"
    if settings.cache_mode == "node":
        return (
            f"the node cache of volume {settings.volume}, shared with the node's pods "
            f"(JuiceFS limit {cache_size_mib} MiB of the {settings.node_cache_budget_mib} MiB "
            "node budget)"
        )
    return f"the pod's own ({cache_size_mib} MiB)"


def _sources_text(sources: ByteSources | None, settings: Settings) -> str:
    if sources is None:
        return "bytes by source unknown (juicefs metrics unreadable, or juicefs restarted)"
    return sources.describe(settings.cache_mode)


async def run(
    settings: Settings,
    reporter: Reporter,
    stop: asyncio.Event | None = None,
    metrics: SidecarMetrics | None = None,
    agent: AgentChannel | None = None,
) -> int:
    stop = stop or asyncio.Event()
    # Created first: time_to_ready counts from here.
    metrics = metrics or SidecarMetrics()
    metrics.describe(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    # The apiserver must never hold up the mount or the stream: Events go out
    # in the background, conditions in order (see OrderedReporter).
    ordered = OrderedReporter(reporter)
    endpoint = await _serve_metrics(metrics, settings.metrics_port, ordered)
    try:
        return await _run(settings, ordered, stop, metrics, agent)
    finally:
        # A sidecar may have only the kubelet's last 2 s of the pod's grace
        # period: the metrics endpoint is not waited for (its server polls every
        # 0.5 s; a CI run saw the kubelet's SIGKILL land while it did), and what
        # is still queued (Unmounted...) gets the moment instead.
        if endpoint is not None:
            endpoint.close_in_background()
        if not await ordered.close(within=1.0):
            log.warning("events.unsent", dropped=ordered.dropped)


async def _serve_metrics(
    metrics: SidecarMetrics, port: int, reporter: Reporter
) -> MetricsEndpoint | None:
    """The /metrics endpoint for the pod's life; None when off or the port is taken.

    A port taken (by an app container that listens there without declaring
    it) costs the metrics only, never the model.
    """
    if port == 0:
        return None
    try:
        endpoint = metrics.serve(port)
    except OSError as err:
        log.warning("metrics.unavailable", port=port, error=str(err))
        await reporter.event(
            WARNING,
            "MetricsUnavailable",
            f"cannot serve Prometheus metrics on port {port} (sidecar.metricsPort): {err}; "
            "the model is streamed and verified as usual",
        )
        return None
    log.info("metrics.serving", port=endpoint.port)
    return endpoint


async def _probe(settings: Settings, full: bool) -> tuple[CacheSpeed | None, bool]:
    """The cache disk's speed (None: not measured) and whether it turned out full."""
    if not should_probe_cache(settings.ssd_policy, full):
        return None, full
    try:
        speed = await asyncio.to_thread(measure, settings.cache_dir)
    except OSError as err:
        # A disk with no room for the probe's file; or one we cannot write at
        # all: JuiceFS will say more (it reads from the store what it cannot cache).
        log.warning("cache.probe_failed", directory=str(settings.cache_dir), error=str(err))
        return None, full or err.errno in (errno.ENOSPC, errno.EDQUOT)
    log.info("cache.probed", write_mbps=round(speed.write_mbps), read_mbps=round(speed.read_mbps))
    return speed, full


async def _run(
    settings: Settings,
    reporter: OrderedReporter,
    stop: asyncio.Event,
    metrics: SidecarMetrics,
    agent: AgentChannel | None = None,
) -> int:
    mount: JuiceFSMount | None = None
    watch = CacheSpaceWatch(
        settings.cache_dir,
        reporter,
        lambda: () if mount is None else tuple(mount.cache_full_lines),
    )
    full = settings.cache_size_mib > 0 and await watch.check("before mounting")
    # The node cache an agent lends is read-only here: the agent measures and writes it.
    lent = agent is not None and settings.cache_mode == "node"
    speed, full = (None, full) if lent else await _probe(settings, full)
    if full and not watch.reported:  # no room for the probe's file (ENOSPC)
        await watch.check("measuring the cache disk failed", full=True)
    cache = cache_plan(
        settings.ssd_policy, speed, settings.cache_min_mbps, settings.cache_size_mib, full
    )
    if speed is not None and cache.slow:
        action = slow_disk_action(cache)
        await reporter.event(
            WARNING,
            "SlowCacheDisk",
            f"cache dir {settings.cache_dir}: {speed.describe()}, below the "
            f"{settings.cache_min_mbps:.0f} MB/s expected of the object store, so cache hits "
            f"would be slower than misses; {action} (ssd policy {settings.ssd_policy})",
        )
        log.warning("cache.slow", policy=settings.ssd_policy, action=action)
    gate = gate_plan(settings.warmup, cache)

    mount = JuiceFSMount(
        settings.mount_spec(cache.cache_size_mib), None if agent is None else AgentMounts(agent)
    )
    # Informational only: the mount must not wait on, or fail with, the apiserver.
    reporter.post_condition("False", "Mounting", "mounting JuiceFS", attempts=1)
    stopping = asyncio.create_task(stop.wait())
    try:
        seconds = await _mount_unless_stopped(mount, stopping)
    except MountError as err:
        stopping.cancel()
        log.error("mount.failed", error=str(err))
        await reporter.event(WARNING, "MountFailed", str(err))
        await mount.stop()
        return 1
    if seconds is None:
        log.info("sidecar.stopping", during="mount")
        await mount.stop()
        return 0
    await reporter.event(
        NORMAL,
        "MountReady",
        f"JuiceFS mounted at {settings.mount_point} (read-only) in {seconds:.1f}s; "
        f"block cache: {_cache_text(settings, cache.cache_size_mib)}",
    )

    # Warmup runs beside the mount; whatever it concludes, the sidecar keeps
    # serving the mount until it is stopped. Reads that fail while juicefs is
    # being remounted are retried by the streamer like any other failed read.
    if lent and agent is not None and gate.verify:
        # Node cache mode: the agent's seal opens the gate; if it cannot
        # seal (a full cache disk...), this pod verifies what it reads.
        work = asyncio.create_task(
            _open_gate_sealed_else_verified(settings, agent, mount, reporter, gate, watch, metrics)
        )
    else:
        work = asyncio.create_task(
            open_gate(
                settings,
                mount,
                reporter,
                gate,
                counters=MountCounters(mount),
                filler=mount if mount.writes_cache else None,
                cache_watch=watch if cache.disk_cache and mount.writes_cache else None,
                metrics=metrics,
                purger=mount if cache.disk_cache and mount.writes_cache else None,
            )
        )
    work.add_done_callback(_log_crash)
    code = await _supervise(settings, mount, reporter, stopping)
    work.cancel()
    await mount.stop()
    if code == 0:
        log.info("sidecar.stopped")
        await reporter.event(NORMAL, "Unmounted", "JuiceFS unmounted on shutdown")
    return code


async def _mount_unless_stopped(mount: JuiceFSMount, stopping: asyncio.Task[Any]) -> float | None:
    """Mount; the seconds it took, or None when SIGTERM came first (MountError if it failed).

    SIGTERM while a mount hangs (metadata engine unreachable) must still
    unmount and exit, or the pod sits in Terminating.
    """
    starting = asyncio.create_task(mount.start())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, MountError):
            await starting
        return None
    return starting.result()


async def _supervise(
    settings: Settings, mount: JuiceFSMount, reporter: Reporter, stopping: asyncio.Task[Any]
) -> int:
    """Keep the mount up until SIGTERM (0); 1 when juicefs died and could not be remounted.

    A dead juicefs is remounted in place, over its dead mount, rather than by
    exiting for the kubelet to restart the container: a new container could
    only mount beside the app's view (see JuiceFSMount.start), never into it.
    """
    while True:
        died = asyncio.create_task(mount.wait_exit())
        await asyncio.wait({died, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stopping.done():
            died.cancel()
            return 0
        code = died.result()
        log.error("mount.died", code=code)
        await reporter.event(
            WARNING,
            "MountDied",
            f"the juicefs process exited with code {code}; the model mount is gone, "
            f"remounting it:\n{mount.log_tail}",
        )
        try:
            seconds = await _mount_unless_stopped(mount, stopping)
        except (MountError, OSError) as err:
            log.error("mount.failed", error=str(err))
            await reporter.event(WARNING, "MountFailed", f"remounting failed: {err}")
            stopping.cancel()
            return 1
        if seconds is None:
            return 0
        log.info("mount.recovered", seconds=round(seconds, 2))
        await reporter.event(
            NORMAL,
            "MountRecovered",
            f"JuiceFS mounted again at {settings.mount_point} in {seconds:.1f}s; "
            "the app's model dir answers again",
        )


async def _best_effort(call: Coroutine[Any, Any, None]) -> None:
    try:
        await call
    except Exception as err:
        log.warning("condition.not_set", error=str(err) or type(err).__name__)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("warmup.crashed", error=str(task.exception()))


async def open_gate(
    settings: Settings,
    mount: BentoTree,
    reporter: Reporter,
    gate: GatePlan,
    counters: MountCounters | None = None,
    filler: CacheFiller | None = None,
    cache_watch: CacheSpaceWatch | None = None,
    metrics: SidecarMetrics | None = None,
    purger: CachePurger | None = None,
) -> None:
    """Verify the model if the gate plan says so, then set the condition to True.

    Any failure leaves the gate closed, with an Event and the condition
    False saying why.
    """
    metrics = metrics or SidecarMetrics()
    try:
        if gate.verify and not await warm(
            settings, mount, reporter, counters, filler, cache_watch, metrics, purger
        ):
            return
    except (OSError, ValueError) as err:
        # No manifest, an unreadable one, a file the mount cannot open...
        log.error("warmup.failed", error=str(err))
        metrics.warmup_failed("WarmupFailed")
        await reporter.event(WARNING, "WarmupFailed", f"cannot stream the model: {err}")
        await _best_effort(reporter.set_condition("False", "WarmupFailed", str(err)[:256]))
        return
    gate = gate_after_warmup(gate, cache_watch is not None and cache_watch.full)
    # The one call that must land: retried until it does or the pod stops.
    await reporter.set_condition("True", gate.reason, gate.message, attempts=None)
    metrics.gate_opened()
    await reporter.event(
        NORMAL, "Ready", f"condition {settings.condition_type}=True: {gate.message}"
    )


async def _open_gate_sealed_else_verified(
    settings: Settings,
    agent: AgentChannel,
    mount: JuiceFSMount,
    reporter: Reporter,
    gate: GatePlan,
    watch: CacheSpaceWatch,
    metrics: SidecarMetrics,
) -> None:
    refused = await open_gate_sealed(settings, agent, reporter, metrics)
    if refused is None:
        return
    await watch.check("the node agent could not seal the model")
    unsealed = gate_unsealed(gate, watch.full)
    await reporter.event(
        WARNING,
        "VerifyingUnsealed",
        f"the node agent could not seal the model ({refused}); this pod streams and verifies "
        "it itself, reading what the node cache lacks from the object store",
    )
    await open_gate(
        settings, mount, reporter, unsealed, counters=MountCounters(mount), metrics=metrics
    )


async def open_gate_sealed(
    settings: Settings, agent: AgentChannel, reporter: Reporter, metrics: SidecarMetrics
) -> str | None:
    """Node cache mode: the node agent opens the gate from its seal.

    The agent verified the Bento once on this node and is the only writer of
    the node cache this sidecar reads; it checks every block is there
    (warming the Bento first if the node is cold) and sets the condition
    itself. Nothing is hashed here again. None when it did (or the warmup's
    time ran out); else why it refused.
    """
    started = time.monotonic()
    await reporter.event(
        NORMAL,
        "WarmupStarted",
        f"asking the node agent to seal {settings.bento_name}:{settings.bento_version} "
        "in the node cache (verified once per node; warmed first if the node is cold)",
    )
    sealing = agent.sibling(reply_timeout=None)
    try:
        async with asyncio.timeout(settings.warmup_timeout_seconds):
            await _seal_until_answered(sealing, reporter)
    except (AgentError, TimeoutError) as err:
        message = str(err) or f"not sealed within {settings.warmup_timeout_seconds}s"
        log.error("seal.failed", error=message)
        metrics.warmup_failed("SealFailed")
        await reporter.event(
            WARNING, "SealFailed", f"the node agent did not seal the model: {message}"
        )
        if isinstance(err, TimeoutError):
            return None  # the warmup's time is up: the gate stays closed
        return message
    finally:
        sealing.close()
    seconds = time.monotonic() - started
    metrics.gate_opened()
    log.info("seal.done", seconds=round(seconds, 2))
    await reporter.event(
        NORMAL,
        "ModelsReady",
        f"model sealed by the node agent in {seconds:.1f}s: verified once on this node, "
        "every block in the node cache",
    )
    # The agent set the condition; `kubectl describe pod` tells it as for a verified pod.
    await reporter.event(
        NORMAL,
        "Ready",
        f"condition {settings.condition_type}=True (ModelsSealed, by the node agent)",
    )
    return None


# Between asking a restarted node agent again to seal (it resumes the warm:
# the blocks already in the node cache are not fetched again).
SEAL_RETRY_SECONDS = 2.0


async def _seal_until_answered(sealing: AgentChannel, reporter: Reporter) -> None:
    """Ask the agent to seal until one answers (AgentError: it refused).

    An agent deleted or rolled mid-seal drops the connection; its successor
    gets the same request, so the warm resumes instead of leaving the gate
    closed until the pod is deleted. The caller's timeout bounds it.
    """
    while True:
        try:
            await sealing.seal()
            return
        except AgentUnreachable as err:
            log.warning("seal.interrupted", error=str(err))
            await reporter.event(
                WARNING,
                "SealInterrupted",
                f"the node agent went away while sealing ({err}); asking it again",
            )
        await asyncio.sleep(SEAL_RETRY_SECONDS)
