"""How much room a directory's file system has (statvfs): the cache disks' one helper."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True)
class DiskSpace:
    """The cache directory's file system, as JuiceFS sees it (statfs: blocks available to us)."""

    total_bytes: int
    free_bytes: int
    total_inodes: int = 0
    free_inodes: int = 0

    def describe(self) -> str:
        return f"{self.free_bytes / MIB:.0f} MiB free of {self.total_bytes / MIB:.0f} MiB"


def disk_space(directory: Path, create: bool = True) -> DiskSpace | None:
    """statvfs of directory (made if missing and create); None when it cannot be read."""
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        st = os.statvfs(directory)
    except OSError:
        return None
    return DiskSpace(
        total_bytes=st.f_blocks * st.f_frsize,
        free_bytes=st.f_bavail * st.f_frsize,
        total_inodes=st.f_files,
        free_inodes=st.f_favail,
    )
