"""What juicefs prints, read: a cache it could not write, and `juicefs warmup --check`."""

from __future__ import annotations

import re
from dataclasses import dataclass

# What juicefs 1.4 logs when it could not cache: a block write that failed
# ("Write to cache file ... failed: ... no space left on device", "Can't
# create cache file ...") and, with --debug only, a block dropped ("Caching
# directory is full (DIR), drop ..."). Not its warning at mount ("not
# enough space (8%) ... for caching"): below the ratio it evicts its own
# blocks to make room, which is a cache at its limit, not a full disk.
_JUICEFS_CACHE_FULL = re.compile(
    r"cache file .*(no space left on device|disk quota exceeded)"
    r"|caching directory is full",
    re.IGNORECASE,
)


def juicefs_says_cache_full(line: str) -> bool:
    """A juicefs log line saying that it cannot (or could not) cache on the disk."""
    return _JUICEFS_CACHE_FULL.search(line) is not None


# `juicefs warmup --check` (1.4): "check cache: 6 files checked, 12 MiB of 16 MiB (75.0%) cached"
_CHECK = re.compile(
    r"check cache: (?P<files>\d+) files checked, (?P<cached>.+?) of (?P<total>.+?) "
    r"\((?P<percent>[\d.]+)%\) cached"
)


@dataclass(frozen=True)
class CacheCheck:
    """What `juicefs warmup --check` says of some files: how much of them the cache holds."""

    files: int
    cached: str  # humanized by juicefs, e.g. "12 MiB"
    total: str
    percent: float

    @property
    def complete(self) -> bool:
        # Both figures are rounded (a block missing from more than ~8 GiB reads 100.0%).
        return self.cached == self.total and self.percent >= 100.0

    def describe(self) -> str:
        return f"{self.cached} of {self.total} ({self.percent:.1f}%)"


def parse_cache_check(output: str) -> CacheCheck | None:
    """The last `check cache:` line of juicefs's output; None when there is none."""
    found = None
    for match in _CHECK.finditer(output):
        found = match
    if found is None:
        return None
    return CacheCheck(int(found["files"]), found["cached"], found["total"], float(found["percent"]))
