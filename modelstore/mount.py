"""Start, supervise and stop `juicefs mount` of one Bento, and expose its models read-only.

JuiceFS (1.x) mounts only the Bento's directory (`--subdir`), read-only
(`--read-only`: every write is EROFS), at a private mount point: the mount
can reach nothing but this Bento. The sidecar reads manifest.json there; the
Bento's models/ is bind-mounted onto the shared mount dir (Bidirectional
propagation), so the app containers see exactly models/, never the manifest
or JuiceFS's internal files (.config, .accesslog, .stats) at the mount's root.

`juicefs mount` runs in the foreground as a supervisor of a worker process:
a worker that crashes is restarted on the same FUSE connection and the mount
lives on. The supervisor exiting is the mount dying.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import structlog

from common.mounts import UnmountError, is_fuse, is_mounted, unmount
from common.ports import free_port
from modelstore.credentials import credentials_env, split_meta_password
from modelstore.juicefs_output import CacheCheck, juicefs_says_cache_full, parse_cache_check
from modelstore.manifest import MODELS_DIR
from modelstore.mountcheck import mount_answers
from modelstore.mountspec import MountSpec
from modelstore.sources import JuiceFSCounters, MountCounters, cache_writes_settled

log = structlog.get_logger("modelstore.mount")

# What a read-only juicefs mount says when its --subdir does not exist (it cannot create it).
_NO_SUBDIR = "read-only file system"


class MountError(Exception):
    pass


class FuseBroker(Protocol):
    """Mounts for a client that may not: the node agent, for an unprivileged sidecar.

    It opens the FUSE connection (the descriptor juicefs serves through
    /dev/fd/N), binds the models where the app reads them once juicefs
    answers, and takes both down. Each call raises MountError when refused.
    """

    async def mount(self) -> int: ...

    async def expose(self) -> None: ...

    async def unmount(self) -> None: ...


# How long a sidecar on its way out waits for the node agent to take its mounts down:
# it may have only the kubelet's last 2 s, and the agent unmounts a gone pod anyway.
BROKER_UNMOUNT_SECONDS = 5.0


def _lazy(path: Path, error: str) -> None:
    # Busy (the app still has files open): detached now, gone when released.
    log.warning("umount.lazy", path=str(path), error=error)


def _unmount(path: Path) -> bool:
    """FUSE mounts stacked on path go (live or dead); what is under them stays.

    The mount dir is the pod's volume, bind-mounted into this container by the
    kubelet with Bidirectional propagation: unmounting that bind would leave
    our mount on the container's own filesystem, where no app container sees it.
    True when a mount was busy (detached lazily: still there for its users).
    """
    busy: list[str] = []

    def lazy(target: Path, error: str) -> None:
        busy.append(error)
        _lazy(target, error)

    try:
        unmount(path, on_busy=lazy, only=is_fuse)
    except UnmountError as err:
        log.error("umount.failed", path=str(path), error=str(err))
    return bool(busy)


class JuiceFSMount:
    def __init__(
        self,
        spec: MountSpec,
        broker: FuseBroker | None = None,
    ) -> None:
        self._spec = spec
        # Unprivileged: the broker (the node agent) mounts and exposes, this process only serves.
        self._broker = broker
        self._cache_size_mib = spec.cache_size_mib
        self._process: asyncio.subprocess.Process | None = None
        self._log_tail: deque[str] = deque(maxlen=40)
        # What juicefs said about a cache disk it cannot write (the last few, and how many).
        self.cache_full_lines: deque[str] = deque(maxlen=5)
        self.cache_full_count = 0
        self._reader: asyncio.Task[None] | None = None
        # juicefs's Prometheus endpoint (a new port each start) and how many
        # times it was started: its counters begin at zero with each process.
        self._metrics_port: int | None = None
        self.generation = 0
        # The private mount's root is the Bento's directory.
        self.bento_dir = spec.private_mount
        self.models_dir = self.bento_dir / MODELS_DIR

    @property
    def writes_cache(self) -> bool:
        """Whether this client may write its cache: not the node cache an agent lent it."""
        return self._broker is None or self._spec.cache_mode != "node"

    @property
    def caches_blocks(self) -> bool:
        """Whether this client writes blocks to a cache disk (not with --cache-size 0)."""
        return self._cache_size_mib > 0 and self.writes_cache

    @property
    def metrics_url(self) -> str | None:
        """Where the running juicefs serves its Prometheus metrics (None before start)."""
        if self._metrics_port is None:
            return None
        return f"http://127.0.0.1:{self._metrics_port}/metrics"

    def node_cache_options(self) -> list[str]:
        """What makes clients that share the node cache directory keep to one budget.

        Each client counts the blocks it found in the directory at its last
        scan plus what it wrote since, and evicts the least recently used
        (whoever fetched them) above --cache-size. Scanning every few seconds
        makes that count the whole directory's, and makes blocks another pod
        fetched since this one mounted visible to it (a client serves from
        disk only the blocks it knows about).
        """
        s = self._spec
        if s.cache_mode != "node" or self._cache_size_mib == 0:
            return []
        if self._broker is not None:
            # The node cache is the agent's, bound read-only here: nothing to
            # evict, but the scan shows this client the blocks the agent wrote.
            return ["--cache-scan-interval", f"{s.cache_scan_seconds}s"]
        return [
            # Blocks readable by the unprivileged sidecars that read this cache
            # (juicefs writes them 0600 by default).
            "--cache-mode",
            "0644",
            "--cache-eviction",
            "lru",
            "--cache-scan-interval",
            f"{s.cache_scan_seconds}s",
            *(
                []
                if s.free_space_ratio is None
                else ["--free-space-ratio", f"{s.free_space_ratio:g}"]
            ),
        ]

    def command(self, mount_point: str | None = None) -> list[str]:
        """`juicefs mount`; mount_point is `/dev/fd/N` when the agent opened the connection."""
        s = self._spec
        port = self._metrics_port or free_port()
        return [
            s.juicefs_bin,
            "--no-agent",  # no pprof debug listener in the pod
            "mount",
            "--read-only",
            "--subdir",
            s.bento_path,
            "--no-usage-report",
            "--no-bgjob",  # no clean-up or metadata backup: a reader writes nothing
            "--cache-dir",
            str(s.cache_dir),
            "--cache-size",
            str(self._cache_size_mib),
            *self.node_cache_options(),
            "--buffer-size",
            str(s.buffer_size_mib),
            "--prefetch",
            str(s.prefetch),
            "--metrics",
            f"127.0.0.1:{port}",
            split_meta_password(s.meta_url)[0],  # its password goes by env
            mount_point or str(s.private_mount),
        ]

    @property
    def pid(self) -> int | None:
        """The `juicefs mount` supervisor's pid, once started."""
        return None if self._process is None else self._process.pid

    @property
    def log_tail(self) -> str:
        return "\n".join(self._log_tail)

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            self._log_tail.append(line)
            log.debug("juicefs", line=line)
            if juicefs_says_cache_full(line):
                self.cache_full_count += 1
                self.cache_full_lines.append(line)
                if self.cache_full_count == 1:
                    log.warning("juicefs.cache_full", line=line)

    def _exited_early(self, code: int) -> MountError:
        s = self._spec
        if _NO_SUBDIR in self.log_tail.lower():
            return MountError(
                f"the volume has no {s.bento_path}: was Bento {s.bento} "
                f"published with `python -m sidecar publish`? (juicefs exited with code {code})\n"
                f"{self.log_tail}"
            )
        return MountError(
            f"juicefs mount exited with code {code} before mounting:\n{self.log_tail}"
        )

    async def start(self, mount_timeout: float = 120.0) -> float:
        """Mount and expose the models; returns the seconds it took."""
        s = self._spec
        started = time.monotonic()
        # A remount after juicefs died: the old worker may still be around, and
        # the dead private mount goes. The dead bind on the shared dir stays:
        # the app container's view of that dir is a slave copy of *that* mount,
        # so only a mount stacked on top of it (never an unmount, then a mount)
        # propagates to the running app. stop() unmounts the whole stack.
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
        fuse_fd: int | None = None
        if self._broker is None:
            _unmount(s.private_mount)
            for directory in (s.private_mount, s.mount_point, s.cache_dir):
                if not is_mounted(directory):  # a dead FUSE mount there fails every stat
                    directory.mkdir(parents=True, exist_ok=True)
        else:
            # The agent replaces a dead private mount with a new one itself.
            fuse_fd = await self._broker.mount()
        env = {**os.environ, **credentials_env(s)}
        self._metrics_port = free_port()
        self.generation += 1
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self.command(None if fuse_fd is None else f"/dev/fd/{fuse_fd}"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own group: stop() can reach an orphaned worker
                pass_fds=() if fuse_fd is None else (fuse_fd,),
            )
        finally:
            if fuse_fd is not None:
                os.close(fuse_fd)  # juicefs holds it now
        assert self._process.stdout is not None
        self._reader = asyncio.create_task(self._pump(self._process.stdout))
        while not await self._answers(s.private_mount):
            if self._process.returncode is not None:
                await self._drain_log()  # the whole log, for the error below
                raise self._exited_early(self._process.returncode)
            if time.monotonic() - started > mount_timeout:
                raise MountError(
                    f"juicefs did not mount within {mount_timeout:.0f}s:\n{self.log_tail}"
                )
            await asyncio.sleep(0.2)
        if not await asyncio.to_thread(self.models_dir.is_dir):
            raise MountError(
                f"{s.bento_path} on the volume has no {MODELS_DIR}/: was Bento "
                f"{s.bento} published with `python -m sidecar publish`?"
            )
        await self._expose()
        return time.monotonic() - started

    @staticmethod
    async def _answers(path: Path) -> bool:
        # mountinfo first; the stat runs in a thread, bounded: on a FUSE mount
        # that hangs it blocks, and SIGTERM and the mount timeout must still work.
        if not is_mounted(path):
            return False
        try:
            return await asyncio.wait_for(asyncio.to_thread(os.path.ismount, path), 5)
        except TimeoutError:
            return False

    async def _expose(self) -> None:
        if self._broker is not None:
            await self._broker.expose()
            return
        # The FUSE mount refuses writes itself, so a plain bind is read-only too.
        # --no-canonicalize: the target may be a dead FUSE mount, where a stat fails.
        target = str(self._spec.mount_point)
        args = ["mount", "--no-canonicalize", "--bind", str(self.models_dir), target]
        result = await asyncio.to_thread(
            subprocess.run, args, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise MountError(f"{' '.join(args)} failed: {result.stderr.strip()}")

    def answers(self) -> bool:
        return mount_answers(self._spec.mount_point)

    async def fill_cache(self, paths: Sequence[Path], rounds: int = 5, pause: float = 1.0) -> None:
        """Put every block of paths into the cache dir: what reading them left out.

        A read through FUSE caches its blocks on the side and drops one when
        juicefs's disk-write queue is full (a slow or busy disk), so a verified
        model may be only partly local. `juicefs warmup` fetches exactly the
        blocks the cache lacks, and waits for the disk instead of dropping.

        It also exits 0 having cached nothing when the object store fails
        (1.4.2: "warmup cache: 6 files (16 MiB bytes)" in 0.1 s with MinIO
        down), so `juicefs warmup --check` says what the cache holds after
        each round; a round short of everything is run again, after a pause,
        up to `rounds` times, then it is a MountError (the caller's to log).
        """
        if not self.caches_blocks:
            return
        for attempt in range(1, rounds + 1):
            await self._warmup(paths)
            check = await self.check_cache(paths)
            if check is None or check.complete:
                break
            log.info("cache.fill_incomplete", attempt=attempt, cached=check.describe())
            if attempt == rounds:
                await self._cache_written()
                raise MountError(
                    f"the cache holds {check.describe()} of the model after {rounds} rounds "
                    "of juicefs warmup (is the object store failing?)"
                )
            await asyncio.sleep(pause * 2 ** (attempt - 1))
        await self._cache_written()

    async def _cache_written(self, every: float = 0.2, quiet: int = 2) -> None:
        """Return once juicefs has written the blocks it queued for the cache disk.

        `juicefs warmup` returns when every block is in the cache's index,
        some still queued in memory for the disk; a client that unmounts then
        (the node agent) would lose them, and the node's next pod would fetch
        them again. Without readable metrics it returns at once (the blocks
        are still written while this mount lives).
        """
        counters = MountCounters(self)
        samples: list[JuiceFSCounters] = []
        while not cache_writes_settled(samples, quiet):
            snapshot = await counters.snapshot()
            if snapshot is None:
                return
            samples.append(snapshot.counters)
            await asyncio.sleep(every)

    async def check_cache(self, paths: Sequence[Path]) -> CacheCheck | None:
        """How much of paths' blocks this client's cache holds (`juicefs warmup --check`)."""
        return parse_cache_check(await self._warmup(paths, "--check"))

    async def evict_cache(self, paths: Sequence[Path]) -> None:
        """Remove every cached block of paths from the cache dir (the node agent's eviction)."""
        await self._warmup(paths, "--evict")

    async def _warmup(self, paths: Sequence[Path], *options: str) -> str:
        """`juicefs warmup [options] paths` against this mount, its log; MountError if it fails."""
        if not paths:
            return ""
        s = self._spec
        process = await asyncio.create_subprocess_exec(
            s.juicefs_bin,
            "--no-agent",
            "warmup",
            "--threads",
            str(s.warmup_threads),
            *options,
            *(str(path) for path in paths),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _, stderr = await process.communicate()
        except BaseException:  # cancelled (the caller's deadline): no warmup left behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            raise
        if process.returncode != 0:
            tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise MountError(
                f"juicefs warmup {' '.join(options)} exited with code {process.returncode}: "
                f"{' '.join(tail)}"
            )
        return stderr.decode(errors="replace")

    async def _drain_log(self, within: float = 1.0) -> None:
        """The last lines of juicefs's output, without waiting for an orphaned worker.

        A worker outlives its supervisor (SIGKILL) and still holds the pipe.
        """
        if self._reader is None:
            return
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), within)

    async def _exit_code(self) -> int:
        # Not Process.wait(): it also waits for the output pipe to close, which
        # a worker that outlived its supervisor keeps open.
        assert self._process is not None
        while (code := self._process.returncode) is None:  # noqa: ASYNC110 (no exit event)
            await asyncio.sleep(0.1)
        return code

    async def wait_exit(self) -> int:
        code = await self._exit_code()
        await self._drain_log()
        return code

    async def _broker_unmount(self) -> None:
        """Ask the broker to take the mounts down (lazily); a failure is logged, not raised:
        the node agent unmounts a pod whose containers have ended by itself."""
        assert self._broker is not None
        try:
            async with asyncio.timeout(BROKER_UNMOUNT_SECONDS):
                await self._broker.unmount()
        except (MountError, TimeoutError) as err:
            log.error("umount.failed", via="node agent", error=str(err))

    async def stop(self, grace: float = 10.0, busy_grace: float = 0.5) -> None:
        """Unmount every FUSE mount we stacked (dead ones too) and end juicefs.

        Nothing may stay on the shared dir: the kubelet cannot tear down a
        volume whose dir a dead FUSE mount makes unstat-able.

        juicefs exits on its own once unmounted. A busy mount (reads hanging
        on an object store that is away) is only detached, and juicefs then
        serves those reads until they end, which may be never: it gets
        `busy_grace` seconds, then SIGTERM. A pod whose app hung on such a
        read is SIGKILLed at the end of its grace period, after which the
        kubelet gives the sidecar 2 s: waiting `grace` here made it exit 137
        with the mount still there (seen on the real node).
        """
        if self._broker is not None:
            # The agent detaches lazily where it must, and this juicefs then
            # serves a mount nobody can reach: it gets busy_grace, not grace.
            await self._broker_unmount()
            busy = True
        else:
            busy = _unmount(self._spec.mount_point)
            busy = _unmount(self._spec.private_mount) or busy
        process = self._process
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(self._exit_code(), busy_grace if busy else grace)
            except TimeoutError:
                process.terminate()  # the supervisor passes SIGTERM on to its worker
                try:
                    await asyncio.wait_for(self._exit_code(), 1.0 if busy else grace)
                except TimeoutError:
                    process.kill()
                    await self._exit_code()
        if process is not None:
            # A worker whose supervisor was killed would keep serving a mount
            # nobody supervises (in a pod it dies with the container anyway).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        await self._drain_log()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
