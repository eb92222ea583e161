"""Where the verified model bytes came from: the local cache, or the object store.

juicefs (1.4) counts, on its `--metrics` endpoint, what it fetched from the
object store: `juicefs_object_request_data_bytes{method="GET"}` (bytes) and
`juicefs_object_request_durations_histogram_seconds_count{method="GET"}`
(requests). Read just before and just after the warmup, the GET bytes are
what came from the store; every other verified byte was read from the block
cache, the node's in node mode. (`juicefs_blockcache_hit_bytes` is not used
for the split: it counts a block again each time readahead re-reads it, so
it can exceed the model's size; it is logged as is.)

A juicefs that died and was remounted during the warmup starts its counters
again: then the split is unknown rather than wrong.
"""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from common.env import CacheMode

log = structlog.get_logger("modelstore.sources")

MIB = 1 << 20
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_GET = 'method="GET"'


@dataclass(frozen=True)
class JuiceFSCounters:
    """One read of a juicefs process's counters."""

    get_bytes: int = 0
    gets: int = 0
    hit_bytes: int = 0
    miss_bytes: int = 0
    # Cache files juicefs began writing, and finished writing (its write-time
    # histogram counts each at the end). Blocks queued for the disk are in neither.
    cache_writes: int = 0
    cache_writes_done: int = 0


def parse_counters(text: str) -> JuiceFSCounters:
    """The counters above from juicefs's Prometheus text (summed over label sets)."""
    totals = dict.fromkeys(
        ("get_bytes", "gets", "hit_bytes", "miss_bytes", "cache_writes", "cache_writes_done"), 0.0
    )
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels = match["name"], match["labels"] or ""
        try:
            value = float(match["value"])
        except ValueError:
            continue
        if name == "juicefs_object_request_data_bytes" and _GET in labels:
            totals["get_bytes"] += value
        elif name == "juicefs_object_request_durations_histogram_seconds_count" and _GET in labels:
            totals["gets"] += value
        elif name == "juicefs_blockcache_hit_bytes":
            totals["hit_bytes"] += value
        elif name == "juicefs_blockcache_miss_bytes":
            totals["miss_bytes"] += value
        elif name == "juicefs_blockcache_writes":
            totals["cache_writes"] += value
        elif name == "juicefs_blockcache_write_hist_seconds_count":
            totals["cache_writes_done"] += value
    return JuiceFSCounters(**{key: int(value) for key, value in totals.items()})


@dataclass(frozen=True)
class Snapshot:
    # Which juicefs process (JuiceFSMount.generation) the counters are from.
    generation: int
    counters: JuiceFSCounters


@dataclass(frozen=True)
class ByteSources:
    """Of `total` verified bytes, how many the object store sent; the rest came from the cache."""

    total: int
    from_store: int
    store_gets: int
    cache_hit_bytes: int

    @property
    def from_cache(self) -> int:
        return self.total - self.from_store

    @property
    def cache_fraction(self) -> float:
        return self.from_cache / self.total if self.total else 1.0

    def describe(self, mode: CacheMode) -> str:
        return (
            f"{self.from_cache / MIB:.0f} MiB ({self.cache_fraction:.1%}) from the "
            f"{mode} cache, {self.from_store / MIB:.0f} MiB from the object store "
            f"({self.store_gets} GETs)"
        )


def byte_sources(total: int, before: Snapshot | None, after: Snapshot | None) -> ByteSources | None:
    """The split, or None when it cannot be told (no metrics, or juicefs restarted between)."""
    if before is None or after is None or before.generation != after.generation:
        return None
    fetched = after.counters.get_bytes - before.counters.get_bytes
    if fetched < 0:
        return None
    # A GET may fetch a whole block of which the model uses part: never more than total.
    return ByteSources(
        total=total,
        from_store=min(fetched, total),
        store_gets=after.counters.gets - before.counters.gets,
        cache_hit_bytes=after.counters.hit_bytes - before.counters.hit_bytes,
    )


def cache_writes_settled(samples: Sequence[JuiceFSCounters], quiet: int) -> bool:
    """Whether juicefs has written every block it queued for the cache disk.

    Each of the last `quiet` samples (taken some time apart) shows the same
    number of writes begun, all of them finished: a queued block would have
    started a write in between.
    """
    if len(samples) < quiet or quiet < 1:
        return False
    last = samples[-quiet:]
    writes = last[0].cache_writes
    return all(s.cache_writes == writes and s.cache_writes_done == writes for s in last)


class Counted(Protocol):
    """What exposes juicefs's metrics: JuiceFSMount."""

    @property
    def metrics_url(self) -> str | None: ...

    @property
    def generation(self) -> int: ...


def fetch_text(url: str, timeout: float) -> str:
    """The body of a GET of url (juicefs's metrics), as text; OSError if it cannot."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body.decode(errors="replace")


@dataclass
class MountCounters:
    """Reads the counters of the juicefs process behind a mount."""

    mount: Counted
    timeout: float = 3.0

    async def snapshot(self) -> Snapshot | None:
        url, generation = self.mount.metrics_url, self.mount.generation
        if url is None:
            return None
        try:
            text = await asyncio.to_thread(fetch_text, url, self.timeout)
        except (OSError, urllib.error.URLError) as err:
            log.warning("metrics.unreadable", url=url, error=str(err))
            return None
        return Snapshot(generation, parse_counters(text))
