"""Stream the pod's model and verify every byte against the manifest (ModelsReady or why not)."""

from __future__ import annotations

import asyncio
import time

import structlog

from modelstore.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestMismatch,
    bento_tag,
    files_to_verify,
    read_manifest,
)
from modelstore.sources import ByteSources, MountCounters, byte_sources
from modelstore.streamer import (
    MIB,
    BentoTree,
    CacheFiller,
    CachePurger,
    VerificationError,
    WarmupTimeout,
    fill_cache_until,
    stream_model,
)
from sidecar.cachewatch import CacheSpaceWatch
from sidecar.decisions import (
    should_fill_cache,
)
from sidecar.env import Settings
from sidecar.metrics import SidecarMetrics
from sidecar.progress import ProgressReporter
from sidecar.reporter import NORMAL, WARNING, Reporter, best_effort

log = structlog.get_logger("sidecar")


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


async def verify_model(
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
    the model again for JuiceFS to fail writing it. Nor is a model larger
    than the cache (CacheTooSmall, said before streaming): JuiceFS evicts
    past its size, and the fill would fetch it several times over.

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
        await best_effort(reporter.set_condition("False", "VerificationFailed", str(err)[:256]))
        return False
    total = sum(f.size for f in files)
    await reporter.event(
        NORMAL,
        "WarmupStarted",
        f"streaming {len(files)} files ({total / MIB:.0f} MiB) of {manifest.bento} into the "
        f"{settings.cache_mode} cache with {settings.warmup_concurrency} parallel reads",
    )
    metrics.stream_started(total)
    # Said before streaming: a model the cache cannot hold is verified, never filled.
    too_small = cache_watch is not None and await cache_watch.check_size(
        total, settings.cache_size_mib
    )
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
        if filler is not None and should_fill_cache(True, full) and not too_small:
            await fill_cache_until(filler, [mount.models_dir / f.path for f in files], deadline)
    except VerificationError as err:
        log.error("warmup.verification_failed", error=str(err))
        metrics.warmup_failed("VerificationFailed")
        await reporter.event(
            WARNING, "VerificationFailed", f"model bytes do not match the manifest: {err}"
        )
        await best_effort(reporter.set_condition("False", "VerificationFailed", str(err)[:256]))
        return False
    except WarmupTimeout as err:
        log.error("warmup.timeout", error=str(err))
        metrics.warmup_failed("WarmupTimedOut")
        await reporter.event(
            WARNING,
            "WarmupTimedOut",
            f"gave up after {settings.warmup_timeout_seconds}s: {err}",
        )
        await best_effort(reporter.set_condition("False", "WarmupTimedOut", str(err)[:256]))
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


def _sources_text(sources: ByteSources | None, settings: Settings) -> str:
    if sources is None:
        return "bytes by source unknown (juicefs metrics unreadable, or juicefs restarted)"
    return sources.describe(settings.cache_mode)
