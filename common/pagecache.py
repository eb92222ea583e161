"""Advice to the kernel's page cache about whole directory trees (posix_fadvise)."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def advise_files(root: Path, advice: int) -> int:
    """posix_fadvise(advice) over every regular file under root, in path order; the bytes
    advised. Advice only, blocking: symlinks are not followed, anything but a regular
    file is never opened (a FIFO would block), and a file or directory gone meanwhile
    is skipped (a tree another process keeps changing, as MinIO's own)."""
    advised = 0
    for path in _files_under(Path(root)):
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, advice)
            advised += os.fstat(fd).st_size
        except OSError:
            pass
        finally:
            os.close(fd)
    return advised


def _files_under(root: Path) -> list[Path]:
    """Every non-directory entry under root, sorted; a directory that vanishes or cannot
    be listed is left out (os.walk skips it) rather than ending the walk."""
    found: list[Path] = []
    for dirpath, _, filenames in os.walk(root):
        found.extend(Path(dirpath, name) for name in filenames)
    return sorted(found)
