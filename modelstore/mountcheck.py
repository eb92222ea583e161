"""The startup check: does the JuiceFS mount answer?

It answers when a FUSE mount is on top of the mount point and listing it
returns; a hung FUSE daemon makes the listing block, which the probe's
timeout turns into a failure instead of a hang. The mount point is itself a
mount already (the pod's volume, bind-mounted in by the kubelet), so "is a
mount point" alone would pass before JuiceFS is there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from common.mounts import is_fuse, top_mount


def mount_answers(mount_point: Path) -> bool:
    top = top_mount(mount_point)
    if top is None or not is_fuse(top):
        return False
    try:
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
