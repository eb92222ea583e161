"""The startup check: does the model mount answer?

It answers when the models are on top of the mount point and listing it
returns: a FUSE mount (JuiceFS), or, on a node cache, the node agent's
read-only bind of its verified local copy of models/. A hung FUSE daemon
makes the listing block, which the probe's timeout turns into a failure
instead of a hang. The mount point is itself a mount already (the pod's
volume, bind-mounted in by the kubelet, writable in the sidecar), so "is a
mount point" alone would pass before the models are there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from common.mounts import Mount, is_fuse, mount_stack


def models_shown(stack: list[Mount]) -> bool:
    """Whether the mounts at the mount point (first made first) show the models: JuiceFS on
    top, or a read-only mount over the pod's own writable volume (the agent's local copy)."""
    if not stack:
        return False
    top = stack[-1]
    return is_fuse(top) or (len(stack) > 1 and top.read_only)


def mount_answers(mount_point: Path) -> bool:
    if not models_shown(mount_stack(mount_point)):
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
