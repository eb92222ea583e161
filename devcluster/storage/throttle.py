"""A directory whose block device is really slow, to test the sidecar's cache-disk probe.

    with ThrottledDirectory(tmp / "slow", bytes_per_second=8 << 20) as slow:
        slow.run_throttled(["dd", ...])   # I/O on slow.path runs at 8 MB/s

An ext4 file system on a loop device, throttled with (first that works)
cgroup v2 `io.max`, cgroup v1 `blkio.throttle.*_bps_device` (both limit the
processes in the cgroup, hence run_throttled()), or dm-delay over the loop
device (every I/O delayed, for every process). Needs root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

from common.mounts import UnmountError, mounts, unmount
from devcluster.lifecycle import StartStop
from devcluster.storage.service import StorageError

MIB = 1 << 20


class ThrottleUnavailable(StorageError):
    """No way to throttle a block device here (the message says why for each method)."""


def _cgroup2_root() -> Path | None:
    return next((m.point for m in mounts() if m.fstype == "cgroup2"), None)


def _cgroup1_blkio() -> Path | None:
    for mount in mounts():
        if mount.fstype == "cgroup" and (mount.point / "blkio.throttle.read_bps_device").exists():
            return mount.point
    return None


class ThrottledDirectory(StartStop):
    """`path` is an ext4 mount whose I/O is limited to bytes_per_second.

    `method` says which throttle worked; `attempts` why the others did not.
    """

    def __init__(
        self, work_dir: Path, *, size_mib: int = 256, bytes_per_second: int = 8 * MIB
    ) -> None:
        self.work_dir = Path(work_dir)
        self.size_mib = size_mib
        self.bps = bytes_per_second
        self.image = self.work_dir / "slow.img"
        self.path = self.work_dir / "mnt"
        self.loop: str | None = None
        self.dm_name: str | None = None
        self.cgroup: Path | None = None
        self.method = ""
        self.attempts: dict[str, str] = {}

    def _sh(self, *args: str) -> str:
        proc = subprocess.run(list(args), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ThrottleUnavailable(f"{' '.join(args)}: {(proc.stderr or proc.stdout).strip()}")
        return proc.stdout.strip()

    @staticmethod
    def _device_numbers(device: str) -> str:
        st = os.stat(device)
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"

    def _new_cgroup(self, root: Path) -> Path:
        group = root / f"bento-juicefs-slow-{os.getpid()}-{id(self)}"
        group.mkdir()
        self.cgroup = group
        return group

    def _try_cgroup2(self, device: str) -> None:
        root = _cgroup2_root()
        if root is None:
            raise ThrottleUnavailable("no cgroup2 hierarchy is mounted")
        if "io" not in (root / "cgroup.controllers").read_text().split():
            raise ThrottleUnavailable(
                f"the io controller is not available in {root} (bound to cgroup v1 blkio?)"
            )
        if "io" not in (root / "cgroup.subtree_control").read_text().split():
            try:
                (root / "cgroup.subtree_control").write_text("+io")
            except OSError as err:
                raise ThrottleUnavailable(f"cannot enable +io in {root}: {err}") from err
        group = self._new_cgroup(root)
        try:
            (group / "io.max").write_text(
                f"{self._device_numbers(device)} rbps={self.bps} wbps={self.bps}"
            )
        except OSError as err:
            raise ThrottleUnavailable(f"cannot write {group}/io.max: {err}") from err

    def _try_cgroup1(self, device: str) -> None:
        root = _cgroup1_blkio()
        if root is None:
            raise ThrottleUnavailable("no cgroup v1 blkio hierarchy is mounted")
        group = self._new_cgroup(root)
        numbers = self._device_numbers(device)
        try:
            for name in ("read", "write"):
                (group / f"blkio.throttle.{name}_bps_device").write_text(f"{numbers} {self.bps}")
        except OSError as err:
            raise ThrottleUnavailable(f"cannot set blkio throttle in {group}: {err}") from err

    def _try_dm_delay(self, device: str) -> str:
        if not shutil.which("dmsetup"):
            raise ThrottleUnavailable("dmsetup is not installed")
        sectors = self._sh("blockdev", "--getsz", device)
        name = f"bento-juicefs-slow-{os.getpid()}"
        self._sh("dmsetup", "create", name, "--table", f"0 {sectors} delay {device} 0 100")
        self.dm_name = name
        return f"/dev/mapper/{name}"

    def start(self) -> Self:
        if os.geteuid() != 0:
            raise ThrottleUnavailable("needs root (loop devices, mounts, cgroups)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.path.mkdir(exist_ok=True)
        with self.image.open("wb") as handle:
            handle.truncate(self.size_mib * MIB)
        self.loop = self._sh("losetup", "--find", "--show", str(self.image))
        device = self.loop
        cgroups: list[tuple[str, Callable[[str], None]]] = [
            ("cgroup v2 io.max", self._try_cgroup2),
            ("cgroup v1 blkio.throttle", self._try_cgroup1),
        ]
        for method, attempt in cgroups:
            try:
                attempt(device)
                self.method = method
                break
            except (ThrottleUnavailable, OSError) as err:
                self.attempts[method] = str(err)
                self._remove_cgroup()
        if not self.method:
            try:
                device = self._try_dm_delay(device)
                self.method = "dm-delay"
            except ThrottleUnavailable as err:
                self.attempts["dm-delay"] = str(err)
                self.stop()
                raise ThrottleUnavailable(
                    "no way to throttle I/O here: "
                    + "; ".join(f"{k}: {v}" for k, v in self.attempts.items())
                ) from None
        self._sh("mkfs.ext4", "-q", "-F", device)
        self._sh("mount", device, str(self.path))
        return self

    def run_throttled(
        self, args: Sequence[str], timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run a command whose I/O on this directory is throttled."""
        group = self.cgroup

        def enter() -> None:
            if group is not None:
                (group / "cgroup.procs").write_text(str(os.getpid()))

        return subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            preexec_fn=enter,
        )

    def _remove_cgroup(self) -> None:
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()
            self.cgroup = None

    def stop(self) -> None:
        with contextlib.suppress(UnmountError):
            unmount(self.path)
        if self.dm_name:
            subprocess.run(["dmsetup", "remove", self.dm_name], capture_output=True, check=False)
            self.dm_name = None
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True, check=False)
            self.loop = None
        self._remove_cgroup()
        self.image.unlink(missing_ok=True)
