"""Real storage for tests: MinIO (S3), Redis (JuiceFS metadata) and a JuiceFS volume.

Everything listens on 127.0.0.1 on a free port and logs to a directory;
every service has start()/stop() and is a context manager, and a failed
start raises StorageError ending with the service's log tail.

    with ObjectStore(tmp / "minio", tmp / "logs") as store, Redis(tmp / "logs") as redis:
        volume = JuiceFSVolume("models", store, redis, tmp / "logs")
        volume.format()
        with volume.mounted(tmp / "mnt"):
            ...

Fault tests: `store.stop(kill=True)` then `store.start()` brings MinIO back on
the same port and data dir. `volume.object_keys(path)` names the objects
holding a file's blocks (JuiceFS 0.14 layout `NAME/chunks/A/B/<slice>_<index>_<size>`),
`store.object_files(key)` the files MinIO keeps for one, and
`store.s3.put_object` replaces one (a corruption MinIO cannot notice).
`ThrottledDirectory` is a directory whose block device is really slow.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from common.ports import free_port
from common.processes import log_tail, stop_group
from devcluster.binaries import ensure_binaries
from devcluster.lifecycle import StartStop

ACCESS_KEY = "bento-juicefs"
SECRET_KEY = "bento-juicefs-secret-key"
BUCKET = "juicefs"
REGION = "us-east-1"
BLOCK_BYTES = 4 << 20  # JuiceFS's default block size
CHUNK_BYTES = 64 << 20
MIB = 1 << 20


class StorageError(RuntimeError):
    """A storage service failed; the message ends with its log tail when there is one."""

    def __init__(self, problem: str, log: Path | None = None) -> None:
        message = problem
        if log is not None:
            message += f"\n--- last lines of {log} ---\n{log_tail(log)}"
        super().__init__(message)


class RedisUnavailable(StorageError):
    """redis-server is missing and cannot be installed here (tests skip on this)."""


def _say(message: str) -> None:
    print(f"[storage {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- locating binaries ----------------------------------------------------------


def find_redis_server(*, install: bool = True, log: Callable[[str], None] = _say) -> Path:
    """Path of redis-server; installs Debian's `redis-server` with apt-get when missing.

    Raises RedisUnavailable (with what to do) when it is missing and apt-get
    is not available or not allowed (not root).
    """
    for candidate in (
        shutil.which("redis-server"),
        "/usr/bin/redis-server",
        "/usr/sbin/redis-server",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    apt = shutil.which("apt-get")
    if not install or apt is None or os.geteuid() != 0:
        why = (
            "installing is disabled"
            if not install
            else "apt-get is not available"
            if apt is None
            else "not running as root"
        )
        raise RedisUnavailable(
            f"redis-server (the JuiceFS metadata engine) is not installed and {why}; "
            "install it (e.g. `apt-get install -y redis-server`) and put it on PATH"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (
        [apt, "update", "-q"],
        [apt, "install", "-y", "-q", "--no-install-recommends", "redis-server"],
    ):
        log(f"redis-server not found; running {' '.join(args)}")
        started = time.monotonic()
        proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
        log(f"  exit {proc.returncode} after {time.monotonic() - started:.0f}s")
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
            raise RedisUnavailable(f"`{' '.join(args)}` failed (exit {proc.returncode}):\n{tail}")
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(found, os.X_OK):
        raise RedisUnavailable("apt-get installed redis-server but it is not on PATH")
    log(f"installed {found}")
    return Path(found)


def storage_binaries() -> dict[str, Path]:
    """minio and juicefs from the pinned build (hack/build-binaries.sh), built on first use."""
    return ensure_binaries(["minio", "juicefs"])


# -- mounts ---------------------------------------------------------------------


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> list[Path]:
    """Every mount point in this mount namespace (from /proc/self/mountinfo).

    Unlike os.path.ismount this also sees a FUSE mount whose daemon died (stat
    fails there with ENOTCONN).
    """
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            points.append(Path(_unescape_mountinfo(fields[4])))
    return points


def is_mounted(path: Path) -> bool:
    return Path(os.path.abspath(path)) in mount_points()


def unmount(path: Path) -> None:
    """Unmount path (lazily if busy); every stacked mount on it goes."""
    for _ in range(8):
        if not is_mounted(path):
            return
        proc = subprocess.run(["umount", str(path)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
    if is_mounted(path):
        raise StorageError(f"cannot unmount {path}")


# -- processes ------------------------------------------------------------------


class _Service(StartStop):
    """A subprocess in its own process group, logging to log_dir/<name>.log."""

    name = "service"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_path = self.log_dir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"# {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                start_new_session=True,
            )

    def _wait_ready(self, probe: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not probe():
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise StorageError(f"{self.name} exited with code {code} on start", self.log_path)
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise StorageError(
                    f"{self.name}: {what} not ready within {timeout:.0f}s", self.log_path
                )
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, *, kill: bool = False, timeout: float = 15.0) -> None:
        """SIGTERM (SIGKILL with kill=True) the process group and wait; idempotent."""
        process, self.process = self.process, None
        if process is not None:
            stop_group(process, timeout, kill=kill)


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# -- S3 -------------------------------------------------------------------------


def _quote(value: str, safe: str = "-_.~") -> str:
    return urllib.parse.quote(value, safe=safe)


class S3Client:
    """Path-style S3 requests signed with AWS Signature Version 4 (hmac + hashlib only).

    One HTTP connection per thread, so it is safe to share across threads.
    """

    def __init__(self, endpoint: str, access_key: str, secret_key: str, region: str = REGION):
        parsed = urllib.parse.urlsplit(endpoint)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"expected http://host:port, got {endpoint!r}")
        self.host = parsed.netloc
        self.hostname = parsed.hostname
        self.port = parsed.port or 80
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []

    def _signing_key(self, day: str) -> bytes:
        key = ("AWS4" + self.secret_key).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        return key

    def signed_headers(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        payload: bytes = b"",
        now: dt.datetime | None = None,
    ) -> dict[str, str]:
        """The headers that authenticate one request (path not yet URL-encoded)."""
        moment = now or dt.datetime.now(dt.UTC)
        stamp = moment.strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        payload_hash = hashlib.sha256(payload).hexdigest()
        headers = {"host": self.host, "x-amz-content-sha256": payload_hash, "x-amz-date": stamp}
        canonical_query = "&".join(
            f"{_quote(k)}={_quote(v)}" for k, v in sorted((query or {}).items())
        )
        names = sorted(headers)
        canonical = "\n".join(
            [
                method,
                _quote(path, safe="/-_.~"),
                canonical_query,
                "".join(f"{n}:{headers[n].strip()}\n" for n in names),
                ";".join(names),
                payload_hash,
            ]
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        signature = hmac.new(self._signing_key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )
        return headers

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.hostname, self.port, timeout=60)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        """Close every connection (a later request reconnects)."""
        with self._lock:
            for conn in self._connections:
                conn.close()

    def request(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        payload: bytes = b"",
        sink: Callable[[bytes], None] | None = None,
    ) -> tuple[int, bytes]:
        """(status, body); with `sink`, the body is streamed to it instead (body is b"")."""
        headers = self.signed_headers(method, path, query, payload)
        url = _quote(path, safe="/-_.~")
        if query:
            url += "?" + "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))
        for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
            conn = self._connection()
            try:
                conn.request(method, url, body=payload or None, headers=headers)
                resp = conn.getresponse()
                if sink is not None and resp.status == 200:
                    while chunk := resp.read(1 << 20):
                        sink(chunk)
                    return resp.status, b""
                return resp.status, resp.read()
            except (http.client.HTTPException, ConnectionError):
                conn.close()  # the next request on it reconnects
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _check(self, status: int, body: bytes, what: str, ok: Sequence[int] = (200,)) -> None:
        if status not in ok:
            raise StorageError(f"S3 {what}: HTTP {status}: {body[:500].decode(errors='replace')}")

    def create_bucket(self, bucket: str) -> None:
        status, body = self.request("PUT", f"/{bucket}")
        if status == 409 and b"BucketAlreadyOwnedByYou" in body:
            return
        self._check(status, body, f"create bucket {bucket}")

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        status, body = self.request("PUT", f"/{bucket}/{key}", payload=data)
        self._check(status, body, f"PUT {bucket}/{key}")

    def get_object(self, bucket: str, key: str) -> bytes:
        status, body = self.request("GET", f"/{bucket}/{key}")
        self._check(status, body, f"GET {bucket}/{key}")
        return body

    def list_objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """key -> size for every object under prefix (ListObjectsV2, all pages)."""
        found: dict[str, int] = {}
        token: str | None = None
        ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
        while True:
            query = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
            if token:
                query["continuation-token"] = token
            status, body = self.request("GET", f"/{bucket}", query)
            self._check(status, body, f"list {bucket}/{prefix}")
            root = ET.fromstring(body)
            for item in root.iter(f"{ns}Contents"):
                found[item.findtext(f"{ns}Key", "")] = int(item.findtext(f"{ns}Size", "0"))
            if root.findtext(f"{ns}IsTruncated") != "true":
                return found
            token = root.findtext(f"{ns}NextContinuationToken")


@dataclass(frozen=True)
class ReadResult:
    bytes: int
    seconds: float
    objects: int
    concurrency: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MIB / max(self.seconds, 1e-9)


def read_objects(s3: S3Client, bucket: str, keys: Sequence[str], concurrency: int) -> ReadResult:
    """GET every key with `concurrency` parallel connections, discarding the bytes."""
    total = 0
    lock = threading.Lock()

    def fetch(key: str) -> None:
        nonlocal total
        got = 0

        def count(chunk: bytes) -> None:
            nonlocal got
            got += len(chunk)

        status, body = s3.request("GET", f"/{bucket}/{key}", sink=count)
        if status != 200:
            raise StorageError(f"GET {bucket}/{key}: HTTP {status}: {body[:300]!r}")
        with lock:
            total += got

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3-get") as pool:
            list(pool.map(fetch, keys))
    finally:
        s3.close()
    return ReadResult(total, time.perf_counter() - started, len(keys), concurrency)


# -- services ---------------------------------------------------------------------


class ObjectStore(_Service):
    """A MinIO server (S3) with fixed root credentials and one bucket.

    stop() and start() again reuse the same port and data dir (objects stay).
    """

    name = "minio"

    def __init__(
        self,
        data_dir: Path,
        log_dir: Path,
        *,
        bucket: str = BUCKET,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        port: int = 0,
        binary: Path | None = None,
    ) -> None:
        super().__init__(log_dir)
        self.data_dir = Path(data_dir)
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.port = port
        self.console_port = 0
        self.binary = binary
        self._s3: S3Client | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def bucket_url(self) -> str:
        return f"{self.endpoint}/{self.bucket}"

    @property
    def s3(self) -> S3Client:
        """A signed S3 client for this server (connections closed on stop())."""
        if self._s3 is None:
            self._s3 = S3Client(self.endpoint, self.access_key, self.secret_key)
        return self._s3

    def _live(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            conn.request("GET", "/minio/health/live")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except (OSError, http.client.HTTPException):
            return False

    def start(self, timeout: float = 60.0) -> None:
        if self.running:
            return
        binary = self.binary or storage_binaries()["minio"]
        self.port = self.port or free_port()
        self.console_port = self.console_port or free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_CI_CD": "1",
        }
        self._spawn(
            [
                str(binary),
                "server",
                "--quiet",
                "--address",
                f"127.0.0.1:{self.port}",
                "--console-address",
                f"127.0.0.1:{self.console_port}",
                str(self.data_dir),
            ],
            env,
        )
        self._wait_ready(self._live, timeout, f"S3 API on 127.0.0.1:{self.port}")
        # "Live" comes before "initialized": MinIO answers 503 for a moment more.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s3.create_bucket(self.bucket)
                return
            except StorageError as err:
                if "XMinioServerNotInitialized" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self, *, kill: bool = False, timeout: float = 15.0) -> None:
        if self._s3 is not None:
            self._s3.close()
        super().stop(kill=kill, timeout=timeout)
        deadline = time.monotonic() + 10
        while _port_answers(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def object_files(self, key: str) -> list[Path]:
        """The files in MinIO's data dir that hold object `key` (xl.meta and data parts).

        Overwriting bytes there is caught by MinIO's own bitrot check (the GET
        fails); to serve different bytes, PUT a changed object with `s3.put_object`.
        """
        directory = self.data_dir / self.bucket / key
        if not directory.is_dir():
            raise StorageError(f"object {self.bucket}/{key} is not in {self.data_dir}")
        return sorted(p for p in directory.rglob("*") if p.is_file())


class Redis(_Service):
    """redis-server on 127.0.0.1 without persistence."""

    name = "redis"

    def __init__(self, log_dir: Path, *, port: int = 0, binary: Path | None = None) -> None:
        super().__init__(log_dir)
        self.port = port
        self.binary = binary

    def url(self, db: int = 1) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        binary = self.binary or find_redis_server()
        self.port = self.port or free_port()
        workdir = self.log_dir / "redis-data"
        workdir.mkdir(parents=True, exist_ok=True)
        self._spawn(
            [
                str(binary),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--dir",
                str(workdir),
                "--loglevel",
                "warning",
            ]
        )
        self._wait_ready(self.ping, timeout, f"PING on 127.0.0.1:{self.port}")


# -- JuiceFS ----------------------------------------------------------------------


@dataclass(frozen=True)
class Slice:
    """One slice of a chunk as `juicefs info` lists it, placed at `offset` in the file."""

    chunk: int
    id: int
    size: int
    off: int
    length: int
    offset: int  # where the slice's visible bytes start in the file

    def blocks(self, block_bytes: int = BLOCK_BYTES) -> list[tuple[int, int, int, int]]:
        """(index, block size, file start, file end) of each block the visible part touches."""
        if self.id == 0:
            return []  # a hole
        found = []
        for index in range(self.off // block_bytes, -(-(self.off + self.length) // block_bytes)):
            block_start = index * block_bytes
            size = min(block_bytes, self.size - block_start)
            start = max(block_start, self.off)
            end = min(block_start + size, self.off + self.length)
            if end > start:
                found.append(
                    (index, size, self.offset + start - self.off, self.offset + end - self.off)
                )
        return found

    def object_keys(self, volume: str, block_bytes: int = BLOCK_BYTES) -> list[str]:
        return [
            f"{volume}/chunks/{self.id // 1000 // 1000}/{self.id // 1000}/{self.id}_{i}_{size}"
            for i, size, _, _ in self.blocks(block_bytes)
        ]


_INFO_SLICE = re.compile(r"^\s*(\d+):\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$")


def parse_info_slices(text: str) -> list[Slice]:
    """The slices in `juicefs info FILE` output (0.14: `INDEX: ID SIZE OFF LEN` per slice)."""
    slices: list[Slice] = []
    in_chunks = False
    position: dict[int, int] = {}
    for line in text.splitlines():
        if line.strip() == "chunks:":
            in_chunks = True
            continue
        match = _INFO_SLICE.match(line) if in_chunks else None
        if match is None:
            continue
        chunk, sid, size, off, length = (int(g) for g in match.groups())
        pos = position.get(chunk, 0)
        slices.append(Slice(chunk, sid, size, off, length, chunk * CHUNK_BYTES + pos))
        position[chunk] = pos + length
    return slices


def cached_blocks(cache_dir: Path) -> dict[str, int]:
    """Block file name (`<slice>_<index>_<size>`) -> bytes of each finished block in a cache dir."""
    found: dict[str, int] = {}
    for path in Path(cache_dir).glob("*/raw/**/*"):
        if path.is_file() and not path.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                found[path.name] = path.stat().st_size
    return found


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
        self._mounts: dict[Path, tuple[subprocess.Popen[bytes], Path]] = {}

    @property
    def meta_url(self) -> str:
        return self.redis.url(self.db)

    def _run(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run(
            [str(self.binary), "--no-agent", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise StorageError(
                f"juicefs {args[0]} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc.stdout + proc.stderr

    def format(self) -> None:
        self._run(
            "format",
            "--storage",
            "minio",
            "--bucket",
            self.store.bucket_url,
            "--access-key",
            self.store.access_key,
            "--secret-key",
            self.store.secret_key,
            self.meta_url,
            self.name,
        )

    def mount(
        self,
        path: Path,
        cache_dir: Path | None = None,
        *,
        extra_args: Sequence[str] = (),
        timeout: float = 60.0,
    ) -> Path:
        """A real FUSE mount of the volume at path (the juicefs process runs in the background)."""
        path = Path(path).resolve()
        path.mkdir(parents=True, exist_ok=True)
        cache = cache_dir or Path(tempfile.mkdtemp(prefix="jfs-cache-", dir=self.log_dir))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"juicefs-mount-{path.name}.log"
        args = [
            str(self.binary),
            "--no-agent",
            "mount",
            "--no-usage-report",
            "--cache-dir",
            str(cache),
            "--metrics",
            f"127.0.0.1:{free_port()}",
            *extra_args,
            self.meta_url,
            str(path),
        ]
        with log.open("ab") as out:
            out.write(f"# {' '.join(args)}\n".encode())
            out.flush()
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._mounts[path] = (process, log)
        deadline = time.monotonic() + timeout
        while not os.path.ismount(path):
            if process.poll() is not None or time.monotonic() > deadline:
                self.umount(path)
                raise StorageError(f"juicefs mount at {path} failed", log)
            time.sleep(0.1)
        return path

    def umount(self, path: Path | None = None, timeout: float = 30.0) -> None:
        """Unmount path (or every mount made here) and wait for its juicefs process."""
        targets = [Path(path).resolve()] if path is not None else list(self._mounts)
        for target in targets:
            with contextlib.suppress(StorageError):
                unmount(target)
            entry = self._mounts.pop(target, None)
            if entry is None:
                continue
            process, _ = entry
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    @contextlib.contextmanager
    def mounted(self, path: Path, cache_dir: Path | None = None) -> Iterator[Path]:
        mount_point = self.mount(path, cache_dir)
        try:
            yield mount_point
        finally:
            self.umount(mount_point)

    def slices(self, path: Path) -> list[Slice]:
        """The slices of a file on a mount of this volume (`juicefs info`)."""
        return parse_info_slices(self._run("info", str(path)))

    def object_keys(self, path: Path) -> list[str]:
        """Keys (in the store's bucket) of the objects holding the file's blocks, in file order."""
        return [key for s in self.slices(path) for key in s.object_keys(self.name)]


# -- a really slow directory ------------------------------------------------------


class ThrottleUnavailable(StorageError):
    pass


def _cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ")[0] == "cgroup2":
            return Path(_unescape_mountinfo(left.split(" ")[4]))
    return None


def _cgroup1_blkio() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        parts = right.split(" ")
        if parts[0] == "cgroup" and "blkio" in parts[-1].split(","):
            return Path(_unescape_mountinfo(left.split(" ")[4]))
    return None


class ThrottledDirectory(StartStop):
    """An ext4 filesystem on a loop device whose I/O is really throttled.

    Tries, in order: cgroup v2 `io.max`, cgroup v1 `blkio.throttle.*_bps_device`
    (both limit bytes/s per device for processes in the cgroup, so use
    run_throttled() to run something there), then dm-delay over the loop device
    (every I/O delayed, for every process). `method` says which one worked;
    `attempts` why the others did not. Needs root.
    """

    def __init__(self, work_dir: Path, *, size_mib: int = 256, bytes_per_second: int = 8 * MIB):
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

    def _device_numbers(self, device: str) -> str:
        st = os.stat(device)
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"

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
        group = root / f"bento-juicefs-slow-{os.getpid()}-{id(self)}"
        group.mkdir()
        self.cgroup = group
        numbers = self._device_numbers(device)
        try:
            (group / "io.max").write_text(f"{numbers} rbps={self.bps} wbps={self.bps}")
        except OSError as err:
            raise ThrottleUnavailable(f"cannot write {group}/io.max: {err}") from err

    def _try_cgroup1(self, device: str) -> None:
        root = _cgroup1_blkio()
        if root is None:
            raise ThrottleUnavailable("no cgroup v1 blkio hierarchy is mounted")
        group = root / f"bento-juicefs-slow-{os.getpid()}-{id(self)}"
        group.mkdir()
        self.cgroup = group
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
        for method, attempt in (
            ("cgroup v2 io.max", self._try_cgroup2),
            ("cgroup v1 blkio.throttle", self._try_cgroup1),
        ):
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
        with contextlib.suppress(StorageError):
            unmount(self.path)
        if self.dm_name:
            subprocess.run(["dmsetup", "remove", self.dm_name], capture_output=True, check=False)
            self.dm_name = None
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True, check=False)
            self.loop = None
        self._remove_cgroup()
        self.image.unlink(missing_ok=True)


# -- everything together ------------------------------------------------------------


class StorageStack(StartStop):
    """MinIO + Redis + a formatted JuiceFS volume + a writer mount, under one work dir."""

    def __init__(self, work_dir: Path, volume_name: str = "models") -> None:
        self.work_dir = Path(work_dir)
        self.logs = self.work_dir / "logs"
        self.store = ObjectStore(self.work_dir / "minio-data", self.logs)
        self.redis = Redis(self.logs)
        self.volume_name = volume_name
        self.volume: JuiceFSVolume | None = None
        self.writer_mount = self.work_dir / "writer"

    def start(self) -> Self:
        binaries = storage_binaries()
        self.store.binary = binaries["minio"]
        try:
            self.redis.start()
            self.store.start()
            self.volume = JuiceFSVolume(
                self.volume_name, self.store, self.redis, self.logs, binary=binaries["juicefs"]
            )
            self.volume.format()
            self.volume.mount(self.writer_mount, self.work_dir / "writer-cache")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def juicefs(self) -> JuiceFSVolume:
        if self.volume is None:
            raise RuntimeError("storage stack not started")
        return self.volume

    def describe(self) -> dict[str, str]:
        return {
            "s3": self.store.bucket_url,
            "meta": self.juicefs.meta_url,
            "volume": self.volume_name,
            "logs": str(self.logs),
        }

    def stop(self) -> None:
        if self.volume is not None:
            self.volume.umount()
        self.store.stop()
        self.redis.stop()


def write_random_model(
    root: Path, shards: Sequence[int], model: str = "llm", version: str = "v1"
) -> Path:
    """A BentoML models/ dir: small metadata files plus random-byte shards of the given sizes."""
    base = root / "models" / model / version
    base.mkdir(parents=True, exist_ok=True)
    (base / "model.yaml").write_text(f"name: {model}\nversion: {version}\n")
    (base / "config.json").write_text(json.dumps({"shards": len(shards)}))
    (base / "tokenizer.json").write_bytes(os.urandom(200_000))
    (root / "models" / model / "latest").write_text(version)
    for i, size in enumerate(shards, 1):
        with (base / f"model-{i:05d}-of-{len(shards):05d}.safetensors").open("wb") as handle:
            left = size
            while left > 0:
                piece = min(left, 16 * MIB)
                handle.write(os.urandom(piece))
                left -= piece
    return root / "models"
