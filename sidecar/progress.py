"""The model stream told as it goes: logs, WarmupProgress Events, stalls and purges."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog

from modelstore.manifest import (
    ManifestFile,
)
from modelstore.streamer import (
    Progress,
)
from sidecar.metrics import SidecarMetrics
from sidecar.reporter import NORMAL, WARNING, Reporter

log = structlog.get_logger("sidecar")


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
