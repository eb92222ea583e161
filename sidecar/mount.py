"""Start, supervise and stop `juicefs mount`, and expose the Bento's models read-only.

JuiceFS mounts the whole volume at a private mount point; the Bento's
models/ directory is then bind-mounted read-only onto the shared mount dir
(Bidirectional propagation), which is all the app containers see. That works
with every JuiceFS release, including those without --subdir or --read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import time
from collections import deque
from pathlib import Path

import structlog

from sidecar.env import Settings
from sidecar.manifest import MODELS_DIR

log = structlog.get_logger("sidecar.mount")


class MountError(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listed(path: Path) -> bool:
    """path is a mount point in /proc/self/mountinfo (octal escapes as the kernel writes them)."""
    target = os.path.abspath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == target:
                return True
    return False


def _live_mount(path: Path) -> bool:
    """A mount that answers (a dead FUSE mount does not)."""
    return os.path.ismount(path)


def _mounted(path: Path) -> bool:
    # mountinfo, never stat: os.path.ismount says False for a FUSE mount whose
    # daemon died (ENOTCONN) and blocks on one whose daemon hangs; both still
    # have to be unmounted.
    return _listed(path)


def _umount(path: Path) -> None:
    for _ in range(4):  # mounts can be stacked (a bind over a dead one from an earlier run)
        if not _mounted(path):
            return
        result = subprocess.run(["umount", str(path)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            # Busy (the app still has files open): detach now, finish when released.
            log.warning("umount.lazy", path=str(path), error=result.stderr.strip())
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


class JuiceFSMount:
    def __init__(self, settings: Settings, cache_size_mib: int | None = None) -> None:
        self._settings = settings
        self._cache_size_mib = settings.cache_size_mib if cache_size_mib is None else cache_size_mib
        self._process: asyncio.subprocess.Process | None = None
        self._log_tail: deque[str] = deque(maxlen=40)
        self._reader: asyncio.Task[None] | None = None
        self.models_dir = settings.private_mount / settings.bento_path.lstrip("/") / MODELS_DIR
        self.bento_dir = self.models_dir.parent

    def command(self) -> list[str]:
        s = self._settings
        return [
            s.juicefs_bin,
            "mount",
            "--no-usage-report",
            "--cache-dir",
            str(s.cache_dir),
            "--cache-size",
            str(self._cache_size_mib),
            "--buffer-size",
            str(s.buffer_size_mib),
            "--prefetch",
            str(s.prefetch),
            "--metrics",
            f"127.0.0.1:{_free_port()}",
            s.meta_url,
            str(s.private_mount),
        ]

    @property
    def log_tail(self) -> str:
        return "\n".join(self._log_tail)

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            self._log_tail.append(line)
            log.debug("juicefs", line=line)

    async def start(self, mount_timeout: float = 120.0) -> float:
        """Mount and expose the models; returns the seconds it took."""
        s = self._settings
        started = time.monotonic()
        # A sidecar that died leaves its mounts behind (the mount dir is shared
        # with Bidirectional propagation): dead FUSE mounts fail every stat.
        _umount(s.mount_point)
        _umount(s.private_mount)
        s.private_mount.mkdir(parents=True, exist_ok=True)
        s.mount_point.mkdir(parents=True, exist_ok=True)
        s.cache_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # Object-store credentials, when given, override those stored at format time.
        if s.access_key:
            env["ACCESS_KEY"] = s.access_key
        if s.secret_key:
            env["SECRET_KEY"] = s.secret_key
        self._process = await asyncio.create_subprocess_exec(
            *self.command(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        assert self._process.stdout is not None
        self._reader = asyncio.create_task(self._pump(self._process.stdout))
        while not _live_mount(s.private_mount):
            if self._process.returncode is not None:
                raise MountError(
                    f"juicefs mount exited with code {self._process.returncode} before mounting:\n"
                    f"{self.log_tail}"
                )
            if time.monotonic() - started > mount_timeout:
                raise MountError(
                    f"juicefs did not mount within {mount_timeout:.0f}s:\n{self.log_tail}"
                )
            await asyncio.sleep(0.2)
        if not self.models_dir.is_dir():
            raise MountError(
                f"the volume has no {self.models_dir.relative_to(s.private_mount)}: "
                f"was Bento {s.bento_name}:{s.bento_version} published "
                "with `python -m sidecar publish`?"
            )
        self._expose()
        return time.monotonic() - started

    def _expose(self) -> None:
        target = str(self._settings.mount_point)
        for args in (
            ["mount", "--bind", str(self.models_dir), target],
            ["mount", "-o", "remount,bind,ro", target],
        ):
            result = subprocess.run(args, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise MountError(f"{' '.join(args)} failed: {result.stderr.strip()}")

    def answers(self) -> bool:
        target = self._settings.mount_point
        try:
            return _mounted(target) and os.path.isdir(target) and os.listdir(target) is not None
        except OSError:
            return False

    async def wait_exit(self) -> int:
        assert self._process is not None
        code = await self._process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        return code

    async def stop(self, grace: float = 10.0) -> None:
        _umount(self._settings.mount_point)
        _umount(self._settings.private_mount)
        process = self._process
        if process is None or process.returncode is not None:
            return
        # juicefs exits on its own once unmounted; a lazy unmount may leave it running.
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                process.kill()
                await process.wait()
