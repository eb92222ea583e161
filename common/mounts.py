"""Mount points from mountinfo, and unmounting what is there.

mountinfo, never stat: `os.path.ismount` says False for a FUSE mount whose
daemon died (ENOTCONN) and blocks on one whose daemon hangs; both still have
to be unmounted. `pid` reads another process's mount namespace (a node's).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_OCTAL = re.compile(r"\\([0-7]{3})")


class UnmountError(RuntimeError):
    """A mount point stayed mounted after umount and umount -l."""


@dataclass(frozen=True)
class Mount:
    point: Path
    fstype: str
    source: str
    # The mount's own options (mountinfo's sixth field), not the superblock's.
    read_only: bool = False


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a mountinfo text (proc(5)), octal escapes decoded."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        mounts.append(
            Mount(
                Path(_unescape(fields[4])),
                fields[sep + 1],
                _unescape(fields[sep + 2]),
                read_only="ro" in fields[5].split(","),
            )
        )
    return mounts


def mounts(pid: int | str = "self") -> list[Mount]:
    """Every mount in the mount namespace of pid (default: this process)."""
    try:
        return parse_mountinfo(Path(f"/proc/{pid}/mountinfo").read_text())
    except OSError:
        return []


def is_mounted(path: Path, pid: int | str = "self") -> bool:
    return top_mount(path, pid) is not None


def top_mount(path: Path, pid: int | str = "self") -> Mount | None:
    """The mount on top of the stack at path (mountinfo lists parents first), if any."""
    on_path = mount_stack(path, pid)
    return on_path[-1] if on_path else None


def mount_stack(path: Path, pid: int | str = "self") -> list[Mount]:
    """Every mount at path, the first made first (mountinfo lists parents first)."""
    target = Path(os.path.abspath(path))
    return [m for m in mounts(pid) if m.point == target]


def is_fuse(mount: Mount) -> bool:
    return mount.fstype == "fuse" or mount.fstype.startswith("fuse.")


def unmount(
    path: Path,
    *,
    on_busy: Callable[[Path, str], None] | None = None,
    only: Callable[[Mount], bool] | None = None,
) -> None:
    """Unmount path, lazily if busy; every mount stacked on it goes.

    With `only`, unmounting stops at the first mount (from the top) it
    refuses: e.g. stale FUSE mounts go, the volume bind a kubelet made stays.
    on_busy(path, error) is told when a plain umount failed and a lazy one follows.
    """
    for _ in range(8):
        top = top_mount(path)
        if top is None or (only is not None and not only(top)):
            return
        # --no-canonicalize: umount otherwise resolves the path first, and a
        # stat on a FUSE mount whose daemon hangs never returns.
        umount = ["umount", "--no-canonicalize"]
        proc = subprocess.run([*umount, str(path)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            if on_busy is not None:
                on_busy(path, proc.stderr.strip())
            subprocess.run([*umount, "-l", str(path)], capture_output=True, check=False)
    top = top_mount(path)
    if top is not None and (only is None or only(top)):
        raise UnmountError(f"cannot unmount {path}")
