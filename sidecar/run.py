"""`python -m sidecar run`: measure the cache disk, mount, open the gate, supervise, unmount.

Exit codes: 0 after SIGTERM (unmounted cleanly); 1 when the mount cannot be
made (or remade after the JuiceFS process died); 2 for a bad environment. A failed or timed
out warmup does not exit: the gate stays closed, an Event says why, and the
mount keeps serving (so the app can still start and report on its own).
When the node agent seals from its verified local copy, the pod mounts
nothing: the agent binds the copy, and the sidecar waits for SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog

from common import env
from modelstore.exposition import MetricsEndpoint
from modelstore.mount import BROKER_UNMOUNT_SECONDS, JuiceFSMount, MountError
from modelstore.sources import MountCounters
from sidecar.agent import AgentChannel, AgentError, AgentMounts
from sidecar.cachedisk import CacheSpeed, measure
from sidecar.cachewatch import CacheSpaceWatch
from sidecar.decisions import (
    CachePlan,
    cache_plan,
    gate_plan,
    seal_before_mount,
    should_measure_cache,
    slow_disk_action,
)
from sidecar.env import Settings
from sidecar.gate import SealOutcome, open_gate, open_gate_sealed, verify_unsealed
from sidecar.metrics import SidecarMetrics
from sidecar.reporter import NORMAL, WARNING, OrderedReporter, Reporter
from sidecar.startup import ModelsShown, startup_app

__all__ = ["run"]

log = structlog.get_logger("sidecar")


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


async def run(
    settings: Settings,
    reporter: Reporter,
    stop: asyncio.Event | None = None,
    metrics: SidecarMetrics | None = None,
    agent: AgentChannel | None = None,
    shown: ModelsShown | None = None,
) -> int:
    stop = stop or asyncio.Event()
    # What the startup probe asks: set once the app's models are shown.
    shown = shown or ModelsShown()
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
    endpoint = await _serve_metrics(metrics, settings.metrics_port, ordered, shown)
    try:
        return await _run(settings, ordered, stop, metrics, shown, agent)
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
    metrics: SidecarMetrics, port: int, reporter: Reporter, shown: ModelsShown
) -> MetricsEndpoint | None:
    """The /metrics endpoint for the pod's life, and the startup probe's path on the same
    port (`common.env.STARTUP_PATH`); None when off or the port is taken.

    The sidecar starts before the app's containers, so a port taken means a
    container before it holds the port without declaring it; the injector
    probes on it all the same, and the Event says why the pod then waits.
    """
    if port == 0:
        return None
    routes = {env.STARTUP_PATH: startup_app(shown, env.STARTUP_WAIT_SECONDS)}
    try:
        endpoint = metrics.serve(port, routes=routes)
    except OSError as err:
        log.warning("metrics.unavailable", port=port, error=str(err))
        await reporter.event(
            WARNING,
            "MetricsUnavailable",
            f"cannot serve Prometheus metrics on port {port} (sidecar.metricsPort): {err}; "
            "the model is streamed and verified as usual, but the startup probe on that "
            "port cannot pass: free the port, or set sidecar.metricsPort to another",
        )
        return None
    log.info("metrics.serving", port=endpoint.port)
    return endpoint


async def _measure_cache(settings: Settings, full: bool) -> tuple[CacheSpeed | None, bool]:
    """The cache disk's speed (None: not measured) and whether it turned out full."""
    if not should_measure_cache(settings.ssd_policy, full):
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


async def _plan_cache(
    settings: Settings, reporter: Reporter, watch: CacheSpaceWatch, lent: bool
) -> CachePlan:
    """What cache to mount with, after checking (and unless lent, measuring) the cache disk."""
    full = settings.cache_size_mib > 0 and await watch.check("before mounting")
    speed, full = (None, full) if lent else await _measure_cache(settings, full)
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
    return cache


async def _run(
    settings: Settings,
    reporter: OrderedReporter,
    stop: asyncio.Event,
    metrics: SidecarMetrics,
    shown: ModelsShown,
    agent: AgentChannel | None = None,
) -> int:
    mount: JuiceFSMount | None = None
    watch = CacheSpaceWatch(
        settings.cache_dir,
        reporter,
        lambda: () if mount is None else tuple(mount.cache_full_lines),
    )
    # The node cache an agent lends is read-only here: the agent measures and writes it.
    lent = agent is not None and settings.cache_mode == "node"
    cache = await _plan_cache(settings, reporter, watch, lent)
    gate = gate_plan(settings.warmup, cache)
    stopping = asyncio.create_task(stop.wait())
    # On the node cache the agent seals (warming a cold node) before this pod
    # mounts, so that the client's start-up scan finds every block.
    sealing = agent is not None and seal_before_mount(lent, gate)
    refused: str | None = None
    if agent is not None and sealing:
        sealed = await _seal(settings, agent, reporter, metrics, shown, stopping)
        if isinstance(sealed, int):  # stopped, or served from the node's copy until stopped
            return sealed
        refused = sealed.refused  # None: sealed, or out of time; a str: why the agent refused
    else:
        # Informational only: the mount must not wait on, or fail with, the apiserver.
        # (Not after a seal: the agent has set the condition by then.)
        reporter.post_condition("False", "Mounting", "mounting JuiceFS", attempts=1)

    mount = JuiceFSMount(
        settings.mount_spec(cache.cache_size_mib), None if agent is None else AgentMounts(agent)
    )
    metrics.relay.add(mount)
    try:
        seconds = await _mount_unless_stopped(mount, stopping)
    except MountError as err:
        stopping.cancel()
        log.error("mount.failed", error=str(err))
        await reporter.event(WARNING, "MountFailed", str(err))
        await mount.stop()
        return 1
    if isinstance(seconds, _Stopped):
        log.info("sidecar.stopping", during="mount")
        await mount.stop()
        return 0
    shown.set()
    await reporter.event(
        NORMAL,
        "MountReady",
        f"JuiceFS mounted at {settings.mount_point} (read-only) in {seconds:.1f}s; "
        f"block cache: {_cache_text(settings, cache.cache_size_mib)}",
    )

    # Warmup runs beside the mount; whatever it concludes, the sidecar keeps
    # serving the mount until it is stopped. Reads that fail while juicefs is
    # being remounted are retried by the streamer like any other failed read.
    # Sealed (or the warmup's time ran out): nothing is left to do here.
    work: asyncio.Task[None] | None = None
    if sealing and refused is not None:
        # The agent refused (a full cache disk...): this pod verifies what it reads.
        work = asyncio.create_task(
            verify_unsealed(settings, mount, reporter, gate, watch, metrics, refused)
        )
    elif not sealing:
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
    if work is not None:
        work.add_done_callback(_log_crash)
    code = await _supervise(settings, mount, reporter, stopping)
    if work is not None:
        work.cancel()
    await mount.stop()
    if code == 0:
        log.info("sidecar.stopped")
        await reporter.event(NORMAL, "Unmounted", "JuiceFS unmounted on shutdown")
    return code


async def _seal(
    settings: Settings,
    agent: AgentChannel,
    reporter: Reporter,
    metrics: SidecarMetrics,
    shown: ModelsShown,
    stopping: asyncio.Task[Any],
) -> SealOutcome | int:
    """The agent's seal, for the mount to follow; or the exit code when nothing is to
    mount: SIGTERM came first (0), or the node's local copy served the pod until it did."""
    # A cold node warms for minutes; SIGTERM meanwhile must still end the pod.
    outcome = await _unless_stopped(open_gate_sealed(settings, agent, reporter, metrics), stopping)
    if isinstance(outcome, _Stopped):
        log.info("sidecar.stopping", during="seal")
        return 0
    if outcome.served_copy and await _show_copy(settings, agent, reporter, shown):
        return await _serve_copy(agent, reporter, stopping)
    return outcome


async def _show_copy(
    settings: Settings, agent: AgentChannel, reporter: Reporter, shown: ModelsShown
) -> bool:
    """Have the agent bind the node's verified local copy as the app's models; whether it
    did. If not, the pod mounts JuiceFS as usual (and the agent exposes what serves then)."""
    started = time.monotonic()
    try:
        await agent.expose()
    except AgentError as err:
        log.warning("copy.not_shown", error=str(err))
        return False
    seconds = time.monotonic() - started
    shown.set()
    log.info("copy.shown", seconds=round(seconds, 2))
    await reporter.event(
        NORMAL,
        "MountReady",
        f"models shown at {settings.mount_point} (read-only) in {seconds:.1f}s from the "
        "node's verified copy on its local disk; no JuiceFS client runs in this pod",
    )
    return True


async def _serve_copy(agent: AgentChannel, reporter: Reporter, stopping: asyncio.Task[Any]) -> int:
    """Nothing to supervise: the bind needs no process. Until SIGTERM, then take it down."""
    await stopping
    try:
        async with asyncio.timeout(BROKER_UNMOUNT_SECONDS):
            await agent.unmount()
    except (AgentError, TimeoutError) as err:
        # The agent takes a pod's mounts down when the pod goes, whatever this says.
        log.warning("copy.unmount_failed", error=str(err))
    log.info("sidecar.stopped")
    await reporter.event(NORMAL, "Unmounted", "the models' bind taken down on shutdown")
    return 0


T = TypeVar("T")


class _Stopped:
    """SIGTERM came while the sidecar waited (a sentinel)."""


_STOPPED = _Stopped()


async def _unless_stopped(
    work: Coroutine[Any, Any, T],
    stopping: asyncio.Task[Any],
    quiet: tuple[type[BaseException], ...] = (),
) -> T | _Stopped:
    """work's result (or its exception), or _STOPPED when SIGTERM came first.

    Work that waits on something outside (a cold node's warm, a mount whose
    metadata engine does not answer) is cancelled then, so the pod ends
    instead of sitting in Terminating; what the cancelled work raises on its
    way out (quiet) is not the caller's to see.
    """
    task = asyncio.create_task(work)
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, *quiet):
            await task
        return _STOPPED
    return task.result()


async def _mount_unless_stopped(
    mount: JuiceFSMount, stopping: asyncio.Task[Any]
) -> float | _Stopped:
    """Mount; the seconds it took, or _STOPPED (MountError if it failed)."""
    return await _unless_stopped(mount.start(), stopping, quiet=(MountError,))


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
        if isinstance(seconds, _Stopped):
            return 0
        log.info("mount.recovered", seconds=round(seconds, 2))
        await reporter.event(
            NORMAL,
            "MountRecovered",
            f"JuiceFS mounted again at {settings.mount_point} in {seconds:.1f}s; "
            "the app's model dir answers again",
        )


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("warmup.crashed", error=str(task.exception()))
