"""The cache, watched: one CacheDiskFull Event when the disk is too full for JuiceFS to
cache, one CacheTooSmall when the model is larger than the cache."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from common.diskspace import disk_space
from sidecar.decisions import (
    cache_full,
    cache_full_message,
    cache_keeps,
    cache_too_small_message,
)
from sidecar.reporter import WARNING, Reporter

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
    # The model is larger than the cache (check_size): verified, never all local.
    too_small: bool = False

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

    async def check_size(self, model_bytes: int, cache_size_mib: int) -> bool:
        """Whether the model is larger than the cache; the CacheTooSmall Event if so."""
        if cache_keeps(model_bytes, cache_size_mib):
            return False
        if not self.too_small:
            self.too_small = True
            log.warning("cache.too_small", model_bytes=model_bytes, cache_size_mib=cache_size_mib)
            await self.reporter.event(
                WARNING, "CacheTooSmall", cache_too_small_message(model_bytes, cache_size_mib)
            )
        return True
