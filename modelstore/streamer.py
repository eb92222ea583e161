"""Stream a model through the JuiceFS mount into the local cache, verifying it.

Up to `concurrency` files are streamed at once, started in load order; each
by one sequential reader (one `range_bytes` read in flight) that hashes as
it goes, in a worker thread, so the event loop never hashes. One sequential
reader per file is what JuiceFS's readahead serves best: several reads in
flight at nearby offsets of one file make JuiceFS 1.4 cancel block fetches
and issue them again (2 GiB behind a 200 MB/s link: 989 GETs for 516 block
objects, 1.8x the model's bytes, 0.75x of raw GETs; one reader per file with
the files in parallel: one GET per block, 0.96-0.99x; BENCHMARKS.md).
A failed read (the object store went away) is retried with backoff until
the deadline, on a freshly opened file: JuiceFS (still 1.4.2) keeps a read
error on the open file handle for good, so every later read on that
descriptor, at any offset, fails with EIO even after the store is back,
while a new descriptor reads fine. A wrong size or checksum is not retried
as a failed read is: with `purge` (a client that may write its cache), the
file's cached blocks are evicted and the file is read once more, through a
fresh descriptor with the kernel's pages of it dropped; only a second
mismatch fails. JuiceFS's cache is keyed by block: a block that went bad on
the cache disk (or was written there by someone else) keeps being served
until it is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import structlog

from modelstore.manifest import ManifestFile, VerificationError
from modelstore.mount import MountError

log = structlog.get_logger("modelstore.streamer")

__all__ = [
    "MIB",
    "RANGE_BYTES",
    "BentoTree",
    "CacheFiller",
    "CachePurger",
    "CopySink",
    "ErrorCallback",
    "Progress",
    "ProgressCallback",
    "Purge",
    "Streamer",
    "VerificationError",
    "WarmupTimeout",
    "content_problem",
    "fill_cache_until",
    "stream_model",
]

RANGE_BYTES = 4 << 20  # one JuiceFS block
MIB = 1 << 20


class WarmupTimeout(Exception):
    pass


@dataclass
class Progress:
    total_bytes: int
    total_files: int
    done_bytes: int = 0
    done_files: int = 0
    started: float = field(default_factory=time.monotonic)
    last_advance: float = field(default_factory=time.monotonic)
    retries: int = 0
    last_error: str | None = None

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    @property
    def bytes_per_s(self) -> float:
        return self.done_bytes / self.elapsed

    @property
    def mb_per_s(self) -> float:
        return self.bytes_per_s / MIB

    @property
    def eta_seconds(self) -> float | None:
        rate = self.done_bytes / self.elapsed
        return (self.total_bytes - self.done_bytes) / rate if rate > 0 else None

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0

    def describe(self) -> str:
        eta = self.eta_seconds
        eta_text = (
            f", ETA {eta:.0f}s" if eta is not None and self.done_bytes < self.total_bytes else ""
        )
        return (
            f"{self.done_bytes / MIB:.0f}/{self.total_bytes / MIB:.0f} MiB "
            f"({self.fraction:.0%}, {self.done_files}/{self.total_files} files) "
            f"at {self.mb_per_s:.1f} MB/s{eta_text}"
        )


ProgressCallback = Callable[[Progress], None]
ErrorCallback = Callable[[Progress, OSError], None]
# Evicts a file's cached blocks, given why (its bytes differ from the manifest); returns
# None once done, or why it could not. The file is read once more either way.
Purge = Callable[[ManifestFile, str], Awaitable[str | None]]


def content_problem(entry: ManifestFile, seen: int, extra: bool, sha256: str) -> str | None:
    """How the bytes read differ from the manifest's entry; None when they are the file listed.

    seen: the bytes read up to the manifest's size; extra: whether there was more.
    """
    if seen != entry.size or extra:
        return f"{entry.path}: size differs from the manifest ({entry.size} bytes expected)"
    if sha256 != entry.sha256:
        return f"{entry.path}: sha256 {sha256} differs from the manifest's {entry.sha256}"
    return None


class CopyWriteError(Exception):
    """The local copy could not be written (its disk full, most often).

    Not an OSError: a failed read through FUSE is retried until the
    deadline, while a copy that cannot be written ends the warm at once.
    """


class _CopyTarget:
    """A copy's descriptor, written by reading threads and closed by the event loop.

    A read stuck in FUSE past its deadline is left running in its thread;
    when it returns, the descriptor may be closed and its number reused for
    another file. The lock and the flag make its write a no-op then.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False
        self._lock = threading.Lock()

    def write(self, data: bytes, offset: int) -> None:
        with self._lock:
            if self.closed:
                return
            try:
                written = os.pwrite(self.fd, data, offset)
            except OSError as err:
                raise CopyWriteError(f"writing the local copy: {err}") from err
            if written != len(data):  # a regular file writes all or fails, unless full
                raise CopyWriteError(
                    f"writing the local copy: {written} of {len(data)} bytes written (disk full?)"
                )

    def release(self) -> int:
        """Stop every later write; the descriptor, for the sink to keep or drop."""
        with self._lock:
            self.closed = True
            return self.fd


def _hash_written(fd: int, length: int, digest: Any) -> None:
    """Feed the first length bytes of a copy's file to digest (in a worker thread)."""
    offset = 0
    while offset < length:
        data = os.pread(fd, min(RANGE_BYTES, length - offset), offset)
        if not data:
            raise OSError(f"the copy's file ends at {offset} of the {length} bytes resumed")
        digest.update(data)
        offset += len(data)


def _read_and_hash(
    fd: int,
    offset: int,
    length: int,
    digest: Any,
    copy: _CopyTarget | None = None,
    drop_read: bool = False,
) -> int:
    """Read length bytes at offset and feed them to digest (in a worker thread); bytes read.

    The digest sees the range only once all of it was read, so a read that
    fails part-way leaves it as it was and the range can be read again.
    With copy, the bytes are also written there at the same offsets. With
    drop_read, the kernel's pages of the range read are let go once hashed.
    """
    start = offset
    chunks = []
    while length > 0:
        data = os.pread(fd, length, offset)
        if not data:
            break  # shorter than the manifest says; the size check catches it
        chunks.append(data)
        offset += len(data)
        length -= len(data)
    for chunk in chunks:
        digest.update(chunk)  # hashlib releases the GIL for large buffers
        if copy is not None:
            copy.write(chunk, start)
        start += len(chunk)
    read = sum(len(chunk) for chunk in chunks)
    if drop_read and read:
        with contextlib.suppress(OSError):  # advice only
            os.posix_fadvise(fd, start - read, read, os.POSIX_FADV_DONTNEED)
    return read


class CopySink(Protocol):
    """Where the bytes streamed are also written, a file each (modelstore.localcopy.LocalCopy).

    `open` before a file's read: a descriptor open for reading and writing,
    and how many bytes from the file's start an earlier warm, stopped
    part-way, left there (a whole number of ranges). Then `keep` once its
    bytes matched the manifest, `drop` when they did not or the read failed,
    or `pause` when the warm was cancelled (the agent stopping: what it
    wrote is resumed from). Each closes the descriptor, whatever happens.
    """

    def open(self, entry: ManifestFile, range_bytes: int) -> tuple[int, int]: ...

    def keep(self, entry: ManifestFile, fd: int) -> None: ...

    def drop(self, entry: ManifestFile, fd: int) -> None: ...

    def pause(self, entry: ManifestFile, fd: int) -> None: ...


class _OpenFile:
    """A model file's descriptor, replaced by a fresh one after a failed read.

    forget: drop the kernel's cached pages of the file first, so that every
    byte is asked of JuiceFS again (a read after its cached blocks were purged).
    """

    def __init__(self, path: Path, forget: bool = False) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self._retired: list[int] = []  # closed at the end: reads in flight may still use them
        if forget:
            with contextlib.suppress(OSError):  # advice only: the hash still decides
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def reopen(self, failed_fd: int) -> None:
        if failed_fd == self.fd:  # the first failed read to get here reopens for all
            fresh = os.open(self.path, os.O_RDONLY)
            self._retired.append(self.fd)
            self.fd = fresh

    def close(self) -> None:
        for fd in (self.fd, *self._retired):
            os.close(fd)


@dataclass(frozen=True)
class _Read:
    """One read of a file through the mount: what the manifest's entry is checked against."""

    seen: int  # bytes read, up to the manifest's size
    extra: bool  # whether the file goes on past that size
    sha256: str
    # Bytes taken from what an earlier warm had written to the copy, not read now.
    resumed: int = 0

    def problem(self, entry: ManifestFile) -> str | None:
        return content_problem(entry, self.seen, self.extra, self.sha256)


@dataclass
class Streamer:
    root: Path
    concurrency: int
    deadline: float  # time.monotonic() value
    on_progress: ProgressCallback
    on_error: ErrorCallback
    range_bytes: int = RANGE_BYTES
    max_backoff: float = 8.0
    # Set where the cache is this client's to change: a file whose bytes differ
    # from the manifest has its cached blocks evicted and is read once more.
    purge: Purge | None = None
    # Set where the node keeps a local copy of what it proved (the node agent).
    copy: CopySink | None = None
    # Set where nothing else reads this mount (the node agent's own): the
    # kernel's pages of what was read and hashed are let go at once, so that
    # they do not crowd the copy's and the cache's pages out of the cgroup.
    drop_reads: bool = False

    async def _read_with_retry(
        self,
        pool: ThreadPoolExecutor,
        handle: _OpenFile,
        offset: int,
        length: int,
        digest: Any,
        progress: Progress,
        copy: _CopyTarget | None = None,
    ) -> int:
        loop = asyncio.get_running_loop()
        delay = 0.5
        while True:
            fd = handle.fd
            left = self.deadline - time.monotonic()
            try:
                # A read can hang rather than fail (JuiceFS retries an object store
                # that answers with errors for minutes): the deadline still holds.
                return await asyncio.wait_for(
                    loop.run_in_executor(
                        pool, _read_and_hash, fd, offset, length, digest, copy, self.drop_reads
                    ),
                    max(left, 0),
                )
            except TimeoutError:
                raise WarmupTimeout(
                    f"a read at offset {offset} of {handle.path.name} did not return in time: "
                    f"{progress.describe()}"
                ) from None
            except OSError as err:
                progress.retries += 1
                progress.last_error = f"{err.strerror or err} at offset {offset}"
                self.on_error(progress, err)
                if time.monotonic() + delay > self.deadline:
                    raise WarmupTimeout(f"gave up retrying reads: {progress.last_error}") from err
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                try:
                    handle.reopen(fd)
                except OSError as reopen_err:
                    progress.last_error = f"reopening {handle.path.name}: {reopen_err}"

    async def _stream_file(
        self, pool: ThreadPoolExecutor, entry: ManifestFile, progress: Progress
    ) -> None:
        """Read and verify one file; with `purge`, a mismatch gets one more read after it."""
        read = await self._read_copied(pool, entry, progress)
        problem = read.problem(entry)
        if problem is not None and read.resumed:
            # What a stopped warm left was kept unproven (an agent's reads as it
            # dies are not to be trusted): the failed read dropped it, so this
            # one reads the whole file through the mount.
            read = await self._read_copied(pool, entry, progress, counted=read.seen)
            problem = read.problem(entry)
        if problem is not None and self.purge is not None:
            not_purged = await self.purge(entry, problem)
            again = await self._read_copied(pool, entry, progress, counted=read.seen, forget=True)
            still = again.problem(entry)
            if still is None:
                problem = None
            elif not_purged is None:
                problem = f"{still} (read again after evicting its cached blocks)"
            else:
                problem = f"{still} (read again; evicting its cached blocks failed: {not_purged})"
        if problem is not None:
            raise VerificationError(problem)
        progress.done_files += 1
        self.on_progress(progress)

    async def _read_copied(
        self,
        pool: ThreadPoolExecutor,
        entry: ManifestFile,
        progress: Progress,
        counted: int = 0,
        forget: bool = False,
    ) -> _Read:
        """_read_file, with the bytes also written to `copy`, kept there only if proven."""
        sink = self.copy
        if sink is None:
            return await self._read_file(pool, entry, progress, counted, forget)
        # The copy's own steps run here, not in threads: they are quick local
        # file operations, and a cancel (another file failed) between a
        # thread's open or rename and its await would leave a .partial file,
        # or a file renamed in after the failed copy was removed.
        fd, resumed = sink.open(entry, self.range_bytes)
        target = _CopyTarget(fd)
        outcome = "drop"
        try:
            digest = hashlib.sha256()
            if resumed:  # what an earlier warm wrote, hashed off the local disk
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(pool, _hash_written, fd, resumed, digest)
            read = await self._read_file(
                pool, entry, progress, counted, forget, target, resumed, digest
            )
            read = replace(read, resumed=resumed)
            if read.problem(entry) is None:
                outcome = "keep"  # keep closes it, whatever happens
                sink.keep(entry, target.release())
            return read
        except asyncio.CancelledError:
            outcome = "pause"  # the warm stops here; the next one resumes from it
            raise
        finally:
            if outcome == "pause":
                sink.pause(entry, target.release())
            elif outcome == "drop":
                # A failed read, or bytes that differ: never the copy's.
                sink.drop(entry, target.release())

    async def _read_file(
        self,
        pool: ThreadPoolExecutor,
        entry: ManifestFile,
        progress: Progress,
        counted: int = 0,
        forget: bool = False,
        copy: _CopyTarget | None = None,
        start: int = 0,
        digest: Any = None,
    ) -> _Read:
        """Read entry through the mount in order, hashing it, and add to progress.

        counted: bytes of this file that progress has already (a second read
        adds only what goes past them: its done_bytes never go back, nor
        past the model's size). forget: see _OpenFile. start: where to begin,
        with digest holding the hash of what comes before (a resumed copy).
        """
        path = self.root / entry.path
        try:
            handle = await asyncio.to_thread(_OpenFile, path, forget)
        except FileNotFoundError:
            raise VerificationError(f"{entry.path}: listed in the manifest but missing") from None
        loop = asyncio.get_running_loop()
        try:
            digest = hashlib.sha256() if digest is None else digest
            seen = start
            for offset in range(start, entry.size, self.range_bytes):
                if time.monotonic() > self.deadline:
                    raise WarmupTimeout(f"timed out at {progress.describe()}")
                length = min(self.range_bytes, entry.size - offset)
                got = await self._read_with_retry(
                    pool, handle, offset, length, digest, progress, copy
                )
                seen += got
                if seen > counted:
                    progress.done_bytes += seen - counted
                    counted = seen
                if got:
                    progress.last_advance = time.monotonic()
                self.on_progress(progress)
                if got < length:
                    break  # shorter than the manifest says
            # Anything past the manifest's size means the file is not the one listed.
            extra = await loop.run_in_executor(pool, os.pread, handle.fd, 1, entry.size)
        finally:
            handle.close()
        return _Read(seen=seen, extra=bool(extra), sha256=digest.hexdigest())

    async def run(self, files: list[ManifestFile]) -> Progress:
        """Stream files (in load order, `concurrency` at once); the first failure ends all."""
        progress = Progress(total_bytes=sum(f.size for f in files), total_files=len(files))
        pool = ThreadPoolExecutor(max_workers=self.concurrency + 1, thread_name_prefix="warmup")
        queue = list(reversed(files))

        async def worker() -> None:
            while queue:
                await self._stream_file(pool, queue.pop(), progress)

        workers = [
            asyncio.ensure_future(worker()) for _ in range(min(self.concurrency, len(files)))
        ]
        try:
            for finished in asyncio.as_completed(workers):
                await finished  # the first failure raises here
        finally:
            for task in workers:
                task.cancel()  # after a failure: the others stop at their next read
            await asyncio.gather(*workers, return_exceptions=True)
            # Never wait for reads stuck in the FUSE mount: they end when it is unmounted.
            pool.shutdown(wait=False, cancel_futures=True)
        return progress


class CacheFiller(Protocol):
    """Completes the local cache with the blocks of files that reading left out."""

    async def fill_cache(self, paths: Sequence[Path]) -> None: ...


class CachePurger(Protocol):
    """Removes the cached blocks of files (`juicefs warmup --evict`): JuiceFSMount.

    Only a client that may write its cache is one: not the node cache an
    agent lends an unprivileged sidecar read-only.
    """

    async def evict_cache(self, paths: Sequence[Path]) -> None: ...


class BentoTree(Protocol):
    """Where the Bento is readable: its directory (manifest.json) and its models/."""

    @property
    def bento_dir(self) -> Path: ...

    @property
    def models_dir(self) -> Path: ...


async def stream_model(
    concurrency: int,
    tree: BentoTree,
    files: list[ManifestFile],
    deadline: float,
    on_progress: ProgressCallback,
    on_error: ErrorCallback,
    filler: CacheFiller | None = None,
    purger: CachePurger | None = None,
    on_purge: Callable[[ManifestFile, str], None] | None = None,
    copy: CopySink | None = None,
    drop_reads: bool = False,
) -> Progress:
    """Read and verify every file through the mount with `concurrency` reads, then fill the cache.

    No files is a VerificationError: a gate never opens on nothing verified.
    With `purger`, a file that differs from the manifest is read once more
    after its cached blocks are evicted (`on_purge` is told first).
    """
    if not files:
        raise VerificationError("no file of the manifest was chosen: nothing to verify")
    streamer = Streamer(
        root=tree.models_dir,
        concurrency=concurrency,
        deadline=deadline,
        on_progress=on_progress,
        on_error=on_error,
        purge=None if purger is None else _purge(purger, tree, deadline, on_purge),
        copy=copy,
        drop_reads=drop_reads,
    )
    progress = await streamer.run(files)
    if filler is not None:
        await fill_cache_until(filler, [tree.models_dir / f.path for f in files], deadline)
    return progress


def _purge(
    purger: CachePurger,
    tree: BentoTree,
    deadline: float,
    on_purge: Callable[[ManifestFile, str], None] | None,
) -> Purge:
    """The streamer's purge: evict one file's cached blocks, by the deadline."""

    async def purge(entry: ManifestFile, problem: str) -> str | None:
        log.warning("verify.purging", path=entry.path, problem=problem)
        if on_purge is not None:
            on_purge(entry, problem)
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 1.0)):
                await purger.evict_cache([tree.models_dir / entry.path])
        except TimeoutError:
            failed = "not done by the warmup deadline"
        except (OSError, MountError) as err:
            failed = str(err) or type(err).__name__
        else:
            log.info("cache.purged", path=entry.path)
            return None
        log.warning("cache.purge_failed", path=entry.path, error=failed)
        return failed

    return purge


async def fill_cache_until(filler: CacheFiller, paths: list[Path], deadline: float) -> None:
    started = time.monotonic()
    try:
        async with asyncio.timeout(max(deadline - started, 1.0)):
            await filler.fill_cache(paths)
    except TimeoutError:
        log.warning("cache.fill_failed", error="not finished by the warmup deadline")
        return
    except (OSError, MountError) as err:
        log.warning("cache.fill_failed", error=str(err))
        return
    log.info("cache.filled", files=len(paths), seconds=round(time.monotonic() - started, 2))
