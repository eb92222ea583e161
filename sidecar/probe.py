"""The startup check: does the JuiceFS mount answer?

It answers when the mount point is a mount and listing it returns; a hung
FUSE daemon makes the listing block, which the probe's timeout turns into a
failure instead of a hang.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def mount_answers(mount_point: Path) -> bool:
    try:
        if not os.path.ismount(mount_point):
            return False
        os.listdir(mount_point)
    except OSError:
        return False
    return True


def wait_for_mount(mount_point: Path, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if mount_answers(mount_point):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
