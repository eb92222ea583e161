"""The agent's privileged acts for a pod: open /dev/fuse, mount, bind read-only, unmount.

Every target is reached through a descriptor opened without following
symlinks, and mounted onto as `/proc/self/fd/N`: the pod's sidecar can write
into the directories these paths pass through (its own emptyDir, its own
FUSE mount), so a name resolved by path could be a symlink it planted to a
host directory. Opening each component with O_NOFOLLOW and checking what
was opened closes that door (the technique runc uses for container mounts).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
FUSE_SUPER_MAGIC = 0x65735546
O_PATH = getattr(os, "O_PATH", 0o10000000)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class MountFailed(OSError):
    """A mount(2) or an open on the way failed; the message names the path."""


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    result = _libc.mount(
        source.encode(),
        target.encode(),
        None if fstype is None else fstype.encode(),
        ctypes.c_ulong(flags),
        None if data is None else data.encode(),
    )
    if result != 0:
        code = ctypes.get_errno()
        raise MountFailed(code, f"mount {source} on {target}: {os.strerror(code)}")


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


@contextmanager
def opened_dir(parent_fd: int, name: str, create: bool = False) -> Iterator[int]:
    """A directory entry of parent_fd, opened O_PATH without following a symlink.

    `name` is one component. With create, a missing directory is made (0755,
    root's). Anything but a real directory there is a MountFailed.
    """
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a single path component: {name!r}")
    if create:
        with suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=parent_fd)
    try:
        fd = os.open(name, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except OSError as err:
        raise MountFailed(err.errno, f"open {name}: {err.strerror}") from None
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise MountFailed(0, f"{name} is not a directory (a symlink or a file was put there)")
        yield fd
    finally:
        os.close(fd)


@contextmanager
def opened_path(path: Path) -> Iterator[int]:
    """A directory the agent names itself (nothing a pod writes is on the way), opened O_PATH."""
    fd = os.open(path, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def open_fuse_device() -> int:
    """A new FUSE connection: the descriptor the sidecar's juicefs will serve."""
    return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)


def mount_fuse(target_fd: int, fuse_fd: int, source: str) -> None:
    """Mount the FUSE connection fuse_fd on the directory target_fd (nosuid, nodev).

    allow_other: the app containers run as other users than the sidecar.
    user_id/group_id name the mount's owner for the kernel's FUSE checks.
    """
    options = f"fd={fuse_fd},rootmode=40000,user_id=0,group_id=0,allow_other"
    _mount(source, fd_path(target_fd), "fuse.juicefs", MS_NOSUID | MS_NODEV, options)


def prepare_stage(root: Path) -> None:
    """A private tmpfs at root, where read-only binds are made before they are placed.

    Private: what is mounted there never propagates, so a bind is made
    read-only there first and only then bound into a pod's volume.
    """
    root.mkdir(parents=True, exist_ok=True)
    if not _is_mount_point(root):
        _mount("bento-juicefs-stage", str(root), "tmpfs", MS_NOSUID | MS_NODEV, "size=1m")
    _mount("none", str(root), None, MS_PRIVATE, None)


def _is_mount_point(path: Path) -> bool:
    return os.stat(path).st_dev != os.stat(path.parent).st_dev


def bind_read_only(source_fd: int, target: Path, stage: Path, noexec: bool = False) -> None:
    """Bind source onto target (a directory the agent names), read-only, nosuid, nodev.

    A bind is made read-only by a second mount call (remount), which changes
    only the mount it is given: copies that propagated to the pod's
    containers when the bind was made would stay writable. So the bind is
    made and made read-only in the private stage, then bound onto target:
    a bind copies the flags of its source, and so does every propagated copy.
    """
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | (MS_NOEXEC if noexec else 0)
    staged = Path(tempfile.mkdtemp(dir=stage))
    try:
        _mount(fd_path(source_fd), str(staged), None, MS_BIND, None)
        try:
            _mount("none", str(staged), None, flags, None)
            with opened_path(target) as under:
                _mount(str(staged), fd_path(under), None, MS_BIND, None)
        finally:
            _umount_detach(staged)
    finally:
        staged.rmdir()


def _umount_detach(path: Path) -> None:
    if _libc.umount2(str(path).encode(), MNT_DETACH) != 0:
        code = ctypes.get_errno()
        raise MountFailed(code, f"umount {path}: {os.strerror(code)}")


def is_fuse_dir(fd: int) -> bool:
    """Whether fd is a directory on a FUSE file system (statfs f_type)."""
    buffer = ctypes.create_string_buffer(128)  # struct statfs is 120 bytes on x86_64
    if _libc.fstatfs(fd, buffer) != 0:
        return False
    f_type = ctypes.c_long.from_buffer(buffer).value
    return f_type == FUSE_SUPER_MAGIC
