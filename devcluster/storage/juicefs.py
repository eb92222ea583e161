"""A JuiceFS 1.x volume over an ObjectStore and a Redis: format, mount, and look inside.

    volume = JuiceFSVolume("models", store, redis, logs)
    volume.format()                        # no keys in the volume: each client brings its own
    with volume.mounted(tmp / "mnt") as mnt:  # the writer: admin metadata URL, root keys (env)
        volume.object_keys(mnt / "file")   # the objects holding its blocks, in file order

This class is the publisher's side: `meta_url` and `keys_env` are the
admin's. Tenants get `reader_meta_url` and a read-only MinIO user (see
`devcluster.storage.stack.StorageStack.tenant`), and mount with `--read-only`.

Object keys (JuiceFS 1.x, as `juicefs info` prints them and MinIO stores
them): `NAME/chunks/<id // 1_000_000>/<id // 1000>/<slice id>_<block index>_<block size>`.
A cache dir keeps the same name under `<dir>/<volume uuid>/raw/chunks/...`,
each block file followed by 4 bytes of checksum per 32 KiB.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.mounts import UnmountError, is_mounted, unmount
from common.ports import free_port
from common.processes import spawn_group, stop_group
from devcluster.storage.minio import ObjectStore
from devcluster.storage.redis import Redis
from devcluster.storage.service import StorageError, storage_binaries

BLOCK_BYTES = 4 << 20  # JuiceFS's default block size
CHUNK_BYTES = 64 << 20
_BLOCK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)$")


@dataclass(frozen=True)
class ObjectRange:
    """One row of `juicefs info FILE`'s objects table: bytes of one object placed in the file."""

    chunk: int
    key: str  # "" for a hole
    size: int  # the object's size
    offset: int  # where the range starts in the object
    length: int
    position: int  # where the range starts in the file


def parse_info_objects(text: str) -> list[ObjectRange]:
    """The rows of the `objects:` table in `juicefs info FILE` output (1.x)."""
    ranges: list[ObjectRange] = []
    in_table = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped == "objects:":
            in_table = True
            continue
        if not in_table or not stripped.startswith("|"):
            continue
        cells = [cell.strip() for cell in stripped.strip("|").split("|")]
        if len(cells) != 6 or not cells[0].isdigit():
            continue  # the header row
        chunk, key, size, offset, length, position = cells
        ranges.append(
            ObjectRange(int(chunk), key, int(size), int(offset), int(length), int(position))
        )
    return ranges


def cached_blocks(cache_dir: Path) -> dict[str, int]:
    """Block name (`<slice>_<index>_<size>`) -> block bytes of each finished block in a cache dir.

    The size comes from the name: the file also holds JuiceFS's checksums.
    """
    found: dict[str, int] = {}
    for path in Path(cache_dir).glob("*/raw/**/*"):
        match = _BLOCK_NAME.match(path.name)
        if match is None:
            continue  # a temporary file still being written, or not a block
        size = int(match.group(3))
        with contextlib.suppress(OSError):
            if path.is_file() and path.stat().st_size >= size:
                found[path.name] = size
    return found


def wait_cached(cache_dir: Path, want: int, within: float = 60.0) -> int:
    """Bytes of finished blocks in cache_dir, once they reach want or within seconds pass."""
    deadline = time.monotonic() + within
    while True:
        have = sum(cached_blocks(cache_dir).values())
        if have >= want or time.monotonic() > deadline:
            return have
        time.sleep(0.2)


def keys_env(access_key: str, secret_key: str) -> dict[str, str]:
    """Object-store keys where JuiceFS 1.x's MinIO client reads them (as the sidecar sets them)."""
    return {"MINIO_ACCESS_KEY": access_key, "MINIO_SECRET_KEY": secret_key}


class JuiceFSVolume:
    """A JuiceFS volume formatted over an ObjectStore bucket and a Redis database."""

    def __init__(
        self,
        name: str,
        store: ObjectStore,
        redis: Redis,
        log_dir: Path,
        *,
        db: int = 1,
        binary: Path | None = None,
    ) -> None:
        self.name = name
        self.store = store
        self.redis = redis
        self.db = db
        self.log_dir = Path(log_dir)
        self.binary = binary or storage_binaries()["juicefs"]
        self._mounts: dict[Path, subprocess.Popen[bytes]] = {}

    @property
    def meta_url(self) -> str:
        """The admin's metadata URL (read-write)."""
        return self.redis.url(self.db)

    @property
    def reader_meta_url(self) -> str:
        """The metadata URL of the Redis user that can only read."""
        return self.redis.reader_url(self.db)

    @property
    def keys_env(self) -> dict[str, str]:
        """The store's root keys where JuiceFS's MinIO client reads them (the volume has none)."""
        return keys_env(self.store.access_key, self.store.secret_key)

    def run(self, *args: str, timeout: float = 300, env: Mapping[str, str] | None = None) -> str:
        """`juicefs ARGS` with the admin's keys (env overrides them); output, or StorageError."""
        proc = subprocess.run(
            [str(self.binary), "--no-agent", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, **self.keys_env, **(env or {})},
        )
        if proc.returncode != 0:
            raise StorageError(
                f"juicefs {args[0]} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc.stdout + proc.stderr

    def format(self, *, store_keys: bool = False) -> None:
        """Format the volume, by default without keys: every client brings its own (env).

        Keys stored at format time would win over every client's own (JuiceFS
        1.4.2's mount ignores its environment then), and any mount could read
        them in its `.config`: a tenant would hold the writer's keys.
        """
        keys = ["--access-key", self.store.access_key, "--secret-key", self.store.secret_key]
        self.run(
            "format",
            "--storage",
            "minio",
            "--bucket",
            self.store.bucket_url,
            *(keys if store_keys else []),
            "--trash-days",
            "0",  # test volumes: a removed file's objects go at once
            self.meta_url,
            self.name,
        )

    def mount(
        self,
        path: Path,
        cache_dir: Path | None = None,
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        meta_url: str | None = None,
        timeout: float = 60.0,
    ) -> Path:
        """A read-write FUSE mount of the volume at path (juicefs runs in the background).

        The admin's metadata URL and keys unless `meta_url` and `env` say otherwise.
        """
        path = Path(path).resolve()
        path.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cache = cache_dir or Path(tempfile.mkdtemp(prefix="jfs-cache-", dir=self.log_dir))
        args = [
            str(self.binary),
            "--no-agent",
            "mount",
            "--no-usage-report",
            "--backup-meta",
            "0",  # no metadata dumps in the bucket next to the blocks
            "--cache-dir",
            str(cache),
            "--metrics",
            f"127.0.0.1:{free_port()}",
            *extra_args,
            meta_url or self.meta_url,
            str(path),
        ]
        log = self.log_dir / f"juicefs-mount-{path.name}.log"
        process = spawn_group(args, log, env={**os.environ, **self.keys_env, **(env or {})})
        self._mounts[path] = process
        deadline = time.monotonic() + timeout
        while not (is_mounted(path) and os.path.ismount(path)):
            if process.poll() is not None or time.monotonic() > deadline:
                self.umount(path)
                raise StorageError(f"juicefs mount at {path} failed", log)
            time.sleep(0.1)
        return path

    def umount(self, path: Path | None = None, timeout: float = 30.0) -> None:
        """Unmount path (or every mount made here); its juicefs processes exit with it."""
        targets = [Path(path).resolve()] if path is not None else list(self._mounts)
        for target in targets:
            with contextlib.suppress(UnmountError):
                unmount(target)
            process = self._mounts.pop(target, None)
            if process is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout)  # juicefs exits on its own once unmounted
            stop_group(process, 5)  # the supervisor's worker too, if anything is left

    @contextlib.contextmanager
    def mounted(self, path: Path, cache_dir: Path | None = None) -> Iterator[Path]:
        mount_point = self.mount(path, cache_dir)
        try:
            yield mount_point
        finally:
            self.umount(mount_point)

    def objects(self, path: Path) -> list[ObjectRange]:
        """What `juicefs info` says holds a file on a mount of this volume, in file order."""
        return parse_info_objects(self.run("info", str(path)))

    def object_keys(self, path: Path) -> list[str]:
        """Keys (in the store's bucket) of the objects holding a file's blocks, in file order."""
        keys = (r.key for r in sorted(self.objects(path), key=lambda r: r.position) if r.key)
        return list(dict.fromkeys(keys))

    def warmup(self, paths: Sequence[Path], *, threads: int | None = None) -> str:
        """`juicefs warmup` (1.x: fetch every block of paths into the mount's cache)."""
        extra = [] if threads is None else ["--threads", str(threads)]
        return self.run("warmup", *extra, *(str(p) for p in paths), timeout=3600)
