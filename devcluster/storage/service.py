"""The storage services JuiceFS needs: MinIO (S3 objects) and Redis (metadata).

Each listens on `host` (127.0.0.1 by default; a host address reachable from
pods in other network namespaces otherwise) on a free port, logs to a
directory, has start()/stop() and is a context manager; a failed start
raises StorageError ending with the service's log tail.

    with ObjectStore(tmp / "minio", tmp / "logs") as store, Redis(tmp / "logs") as redis:
        store.s3.put_object(store.bucket, "key", b"bytes")
        store.grant_read("reader", "reader-secret", "models")  # GET/LIST under models/ only
        redis.url(1)                     # the admin (the publisher's, read-write)
        redis.reader_url(1)              # a user that can only read (READER_COMMANDS)
        redis.command("SET", "k", "v", user=READER_USER, password=READER_PASSWORD)  # NOPERM

Both have two kinds of users: the admin (MinIO's root user, Redis's
`default` user with a password) whom only the publisher gets, and readers
(a MinIO user with a read-only policy on one volume's prefix; a Redis user
allowed only the commands `juicefs mount --read-only` needs), whose
credentials tenants get. Neither accepts anonymous writes.

Fault tests: `store.stop(kill=True)` then `store.start()` brings MinIO back on
the same port and data dir; `store.object_files(key)` names the files MinIO
keeps for one object. `ObjectStore(..., netns=NAME, host=ADDR, port=PORT)`
runs MinIO inside that network namespace (see `devcluster.storage.shaped_link`);
its Prometheus metrics (`/minio/v2/metrics/cluster`) need no token.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.ports import free_port, port_answers
from common.processes import log_tail, spawn_group, stop_group
from devcluster.binaries import ensure_binaries
from devcluster.lifecycle import StartStop
from devcluster.packages import PackagesError, ensure_packages
from devcluster.storage.s3 import S3Client, S3Error

# The admin's (publisher's) keys: MinIO's root user. Fixed development values.
ACCESS_KEY = "bento-juicefs"
SECRET_KEY = "bento-juicefs-secret-key"
BUCKET = "juicefs"
LOOPBACK = "127.0.0.1"

# Redis: the `default` user is the admin, with this password; READER_USER can only read.
REDIS_PASSWORD = "bento-juicefs-redis-admin"
READER_USER = "jfs-reader"
READER_PASSWORD = "bento-juicefs-redis-reader"

# What `juicefs mount --read-only` (JuiceFS 1.4.2) sends a Redis metadata engine,
# measured with MONITOR while mounting, listing, reading, stat-ing and warming
# a volume: SELECT the db, GET (the format, attributes, counters), MGET
# (attributes of a directory's entries), HGET (a name in a directory),
# HSCAN (a directory's entries), LRANGE (a file's slices). Nothing else is
# needed: a read-only mount opens no session (no ZADD/HSET) and so never loads
# its Lua scripts (no SCRIPT LOAD, no EVALSHA: lookups fall back to HGET +
# GET). INFO and CLUSTER INFO are left out (server details, @dangerous): the
# mount then logs "parse info: NOPERM" once, treats the server as standalone
# and skips its maxmemory-policy check (which would try CONFIG SET).
READER_COMMANDS: tuple[str, ...] = ("select", "get", "mget", "hget", "hscan", "lrange")


class StorageError(RuntimeError):
    """A storage service failed; the message ends with its log tail when there is one."""

    def __init__(self, problem: str, log: Path | None = None) -> None:
        message = problem
        if log is not None:
            message += f"\n--- last lines of {log} ---\n{log_tail(log)}"
        super().__init__(message)


class RedisUnavailable(StorageError):
    """redis-server is missing and cannot be installed here (tests skip on this)."""


class RedisReplyError(StorageError):
    """Redis answered a command with an error (e.g. `NOPERM ...` for a reader's write)."""


def find_redis_server() -> Path:
    """redis-server, installed from Debian's `redis-server` package when missing."""
    try:
        return ensure_packages({"redis-server": "redis-server"})["redis-server"]
    except PackagesError as err:
        raise RedisUnavailable(f"redis-server (the JuiceFS metadata engine): {err}") from err


def storage_binaries() -> dict[str, Path]:
    """minio, mc and juicefs from the pinned build (hack/build-binaries.sh), built on first use."""
    return ensure_binaries(["minio", "mc", "juicefs"])


def read_only_policy(bucket: str, prefix: str) -> dict[str, Any]:
    """An IAM policy allowing GET of the objects under prefix/ and LIST of that prefix only."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/{prefix}/*"],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket}"],
                "Condition": {"StringLike": {"s3:prefix": [f"{prefix}/*"]}},
            },
        ],
    }


class Service(StartStop):
    """A subprocess in its own process group, logging to log_dir/<name>.log."""

    name = "service"

    def __init__(self, log_dir: Path, host: str = LOOPBACK) -> None:
        self.log_dir = Path(log_dir)
        self.log_path = self.log_dir / f"{self.name}.log"
        self.host = host
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.process = spawn_group(args, self.log_path, env=env)

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


class ObjectStore(Service):
    """A MinIO server (S3) with fixed root credentials and one bucket.

    stop() and start() again reuse the same port and data dir (objects stay).
    """

    name = "minio"

    def __init__(
        self,
        data_dir: Path,
        log_dir: Path,
        *,
        host: str = LOOPBACK,
        bucket: str = BUCKET,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        port: int = 0,
        binary: Path | None = None,
        netns: str | None = None,
    ) -> None:
        super().__init__(log_dir, host)
        self.netns = netns  # run inside this network namespace (host:port is there)
        self.data_dir = Path(data_dir)
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.port = port
        self.console_port = 0
        self.binary = binary
        self.mc_binary: Path | None = None
        self._s3: S3Client | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

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
            conn = http.client.HTTPConnection(self.host, self.port, timeout=1)
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
        if self.netns and not self.port:
            raise StorageError("a store in a network namespace needs its port given")
        self.port = self.port or free_port(self.host)
        self.console_port = self.console_port or free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_CI_CD": "1",
            "MINIO_PROMETHEUS_AUTH_TYPE": "public",  # request counts for benchmarks
        }
        inside = ["nsenter", f"--net=/run/netns/{self.netns}", "--"] if self.netns else []
        self._spawn(
            [
                *inside,
                str(binary),
                "server",
                "--quiet",
                "--address",
                f"{self.host}:{self.port}",
                "--console-address",
                f"{LOOPBACK}:{self.console_port}",
                str(self.data_dir),
            ],
            env,
        )
        self._wait_ready(self._live, timeout, f"S3 API on {self.host}:{self.port}")
        # "Live" comes before "initialized": MinIO answers 503 for a moment more.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s3.create_bucket(self.bucket)
                return
            except S3Error as err:
                if "XMinioServerNotInitialized" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self, *, kill: bool = False, timeout: float = 15.0) -> None:
        if self._s3 is not None:
            self._s3.close()
        super().stop(kill=kill, timeout=timeout)
        deadline = time.monotonic() + 10
        while self.port and port_answers(self.port, self.host) and time.monotonic() < deadline:
            time.sleep(0.05)

    def mc(self, *args: str) -> str:
        """`mc ARGS` as the root user, the server as alias `store`; its output, or StorageError.

        The credentials go in `MC_HOST_store`, never on the command line; mc's
        config dir is a throwaway one.
        """
        binary = self.mc_binary or storage_binaries()["mc"]
        host = urllib.parse.urlsplit(self.endpoint).netloc
        root = f"{urllib.parse.quote(self.access_key, safe='')}:" + urllib.parse.quote(
            self.secret_key, safe=""
        )
        with tempfile.TemporaryDirectory(prefix="mc-") as config:
            env = {**os.environ, "MC_HOST_store": f"http://{root}@{host}"}
            proc = subprocess.run(
                [str(binary), "--config-dir", config, "--no-color", "--quiet", *args],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env=env,
            )
        if proc.returncode != 0:
            raise StorageError(
                f"mc {' '.join(args[:3])} failed (exit {proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}"
            )
        return proc.stdout

    def grant_read(self, access_key: str, secret_key: str, prefix: str) -> None:
        """A MinIO user that may only GET the bucket's objects under prefix/ and LIST them.

        Idempotent (users and policies live in the data dir: they survive a restart).
        """
        policy = f"{self.bucket}-{prefix}-read-only"
        with tempfile.NamedTemporaryFile("w", suffix=".json") as document:
            json.dump(read_only_policy(self.bucket, prefix), document)
            document.flush()
            self.mc("admin", "policy", "create", "store", policy, document.name)
        self.mc("admin", "user", "add", "store", access_key, secret_key)
        try:
            self.mc("admin", "policy", "attach", "store", policy, "--user", access_key)
        except StorageError as err:
            if "already" not in str(err).lower():
                raise

    def object_files(self, key: str) -> list[Path]:
        """The files in MinIO's data dir that hold object `key` (xl.meta and data parts).

        Overwriting bytes there is caught by MinIO's own bitrot check (the GET
        fails); to serve different bytes, PUT a changed object with `s3.put_object`.
        """
        directory = self.data_dir / self.bucket / key
        if not directory.is_dir():
            raise StorageError(f"object {self.bucket}/{key} is not in {self.data_dir}")
        return sorted(p for p in directory.rglob("*") if p.is_file())


class Redis(Service):
    """redis-server without persistence, on 127.0.0.1 and on `host` when that differs.

    No anonymous access: the `default` user (the admin) has `password`, and
    `reader` (user, password) may run READER_COMMANDS only, on any key
    (ACLs cannot tell Redis's numbered databases apart). Both are set from
    the command line, so a restart brings them back.
    """

    name = "redis"

    def __init__(
        self,
        log_dir: Path,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        binary: Path | None = None,
        password: str = REDIS_PASSWORD,
        reader: tuple[str, str] = (READER_USER, READER_PASSWORD),
    ) -> None:
        super().__init__(log_dir, host)
        self.port = port
        self.binary = binary
        self.password = password
        self.reader_user, self.reader_password = reader

    def _url(self, user: str, password: str, db: int) -> str:
        credentials = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
        return f"redis://{credentials}@{self.host}:{self.port}/{db}"

    def url(self, db: int = 1) -> str:
        """The admin's metadata URL (read-write): for the publisher only."""
        return self._url("default", self.password, db)

    def reader_url(self, db: int = 1) -> str:
        """The reader's metadata URL: what tenants get."""
        return self._url(self.reader_user, self.reader_password, db)

    def command(
        self,
        *args: str,
        user: str = "default",
        password: str | None = None,
        db: int | None = None,
        timeout: float = 5.0,
    ) -> Any:
        """One command on a fresh connection, as user (the admin by default), in db if given.

        Returns the decoded reply (str, int, None or a list); an error reply
        raises RedisReplyError with Redis's message (`NOPERM ...`).
        """
        secret = self.password if password is None else password
        requests: list[Sequence[str]] = [("AUTH", user, secret)]
        if db is not None:
            requests.append(("SELECT", str(db)))
        with (
            socket.create_connection((self.host, self.port), timeout=timeout) as sock,
            sock.makefile("rb") as stream,
        ):
            for request in [*requests, args]:
                sock.sendall(_resp_request(request))
                reply = _resp_reply(stream)
            return reply

    def ping(self) -> bool:
        try:
            return bool(self.command("PING", timeout=1) == "PONG")
        except (OSError, StorageError):
            return False

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        binary = self.binary or find_redis_server()
        self.port = self.port or free_port(self.host)
        workdir = self.log_dir / "redis-data"
        workdir.mkdir(parents=True, exist_ok=True)
        addresses = list(dict.fromkeys([LOOPBACK, self.host]))
        reads = [f"+{name}" for name in READER_COMMANDS]
        self._spawn(
            [
                str(binary),
                "--port",
                str(self.port),
                "--bind",
                *addresses,
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
                # ACL rules: on, its password, every key, no pub/sub channel, commands.
                "--user",
                *("default", "reset", "on", f">{self.password}", "~*", "&*", "+@all"),
                "--user",
                *(self.reader_user, "reset", "on", f">{self.reader_password}", "~*"),
                *("resetchannels", "-@all", *reads),
            ]
        )
        self._wait_ready(self.ping, timeout, f"PING on {self.host}:{self.port}")


def _resp_request(args: Sequence[str]) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _resp_reply(stream: Any) -> Any:
    """One RESP2 reply from a binary file object."""
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("connection closed by Redis")
    kind, body = line[:1], line[1:-2].decode(errors="replace")
    if kind == b"+":
        return body
    if kind == b"-":
        raise RedisReplyError(body)
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data: bytes = stream.read(size + 2)
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_resp_reply(stream) for _ in range(count)]
    raise OSError(f"unexpected reply from Redis: {line[:80]!r}")
