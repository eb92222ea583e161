"""Measure the cache directory's speed before trusting it (its space: common.diskspace).

A JuiceFS cache on a network disk made cache hits slower than misses; so the
sidecar writes and reads a test file with the page cache out of the way
(O_DIRECT where the filesystem allows it, else fsync and fadvise) and
compares the speeds with what the object store is expected to deliver.
"""

from __future__ import annotations

import mmap
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

BLOCK = 4 << 20
MIB = 1 << 20


@dataclass(frozen=True)
class CacheSpeed:
    write_mbps: float
    read_mbps: float
    direct_io: bool

    def slower_than(self, minimum: float) -> bool:
        return min(self.write_mbps, self.read_mbps) < minimum

    def describe(self) -> str:
        mode = "direct I/O" if self.direct_io else "fsync"
        return f"write {self.write_mbps:.0f} MB/s, read {self.read_mbps:.0f} MB/s ({mode})"


def _open(path: Path, flags: int) -> tuple[int, bool]:
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o600), True
        except OSError:
            pass  # tmpfs and some FUSE filesystems refuse O_DIRECT
    return os.open(path, flags, 0o600), False


def measure(directory: Path, size_mib: int = 64) -> CacheSpeed:
    directory.mkdir(parents=True, exist_ok=True)
    # Its own name: in node mode the directory is shared by the node's pods.
    path = directory / f".bento-juicefs-probe-{uuid.uuid4().hex}"
    buffer = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT requires
    buffer.write(os.urandom(BLOCK))
    blocks = max(1, size_mib * MIB // BLOCK)
    try:
        fd, direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        start = time.perf_counter()
        try:
            for _ in range(blocks):
                os.write(fd, buffer)
            os.fsync(fd)
        finally:
            os.close(fd)
        write_s = time.perf_counter() - start

        fd, direct_read = _open(path, os.O_RDONLY)
        if not direct_read:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        try:
            while os.readv(fd, [buffer]) > 0:
                pass
        finally:
            os.close(fd)
        read_s = time.perf_counter() - start
    finally:
        buffer.close()
        path.unlink(missing_ok=True)
    total = blocks * BLOCK / MIB
    return CacheSpeed(total / max(write_s, 1e-9), total / max(read_s, 1e-9), direct and direct_read)
