"""The storage services JuiceFS needs: MinIO (S3 objects) and Redis (metadata).

Each listens on `host` (127.0.0.1 by default; a host address reachable from
pods in other network namespaces otherwise) on a free port, logs to a
directory, has start()/stop() and is a context manager; a failed start
raises StorageError ending with the service's log tail.

    with ObjectStore(tmp / "minio", tmp / "logs") as store, Redis(tmp / "logs") as redis:
        store.s3.put_object(store.bucket, "key", b"bytes")
        redis.url(1)

Fault tests: `store.stop(kill=True)` then `store.start()` brings MinIO back on
the same port and data dir; `store.object_files(key)` names the files MinIO
keeps for one object. `ObjectStore(..., netns=NAME, host=ADDR, port=PORT)`
runs MinIO inside that network namespace (see `devcluster.storenet`);
its Prometheus metrics (`/minio/v2/metrics/cluster`) need no token.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from common.ports import free_port, port_answers
from common.processes import log_tail, spawn_group, stop_group
from devcluster.binaries import ensure_binaries
from devcluster.lifecycle import StartStop
from devcluster.packages import PackagesError, ensure_packages
from devcluster.s3 import S3Client, S3Error

ACCESS_KEY = "bento-juicefs"
SECRET_KEY = "bento-juicefs-secret-key"
BUCKET = "juicefs"
LOOPBACK = "127.0.0.1"


class StorageError(RuntimeError):
    """A storage service failed; the message ends with its log tail when there is one."""

    def __init__(self, problem: str, log: Path | None = None) -> None:
        message = problem
        if log is not None:
            message += f"\n--- last lines of {log} ---\n{log_tail(log)}"
        super().__init__(message)


class RedisUnavailable(StorageError):
    """redis-server is missing and cannot be installed here (tests skip on this)."""


def find_redis_server() -> Path:
    """redis-server, installed from Debian's `redis-server` package when missing."""
    try:
        return ensure_packages({"redis-server": "redis-server"})["redis-server"]
    except PackagesError as err:
        raise RedisUnavailable(f"redis-server (the JuiceFS metadata engine): {err}") from err


def storage_binaries() -> dict[str, Path]:
    """minio and juicefs from the pinned build (hack/build-binaries.sh), built on first use."""
    return ensure_binaries(["minio", "juicefs"])


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
    """redis-server without persistence, on 127.0.0.1 and on `host` when that differs."""

    name = "redis"

    def __init__(
        self,
        log_dir: Path,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        binary: Path | None = None,
    ) -> None:
        super().__init__(log_dir, host)
        self.port = port
        self.binary = binary

    def url(self, db: int = 1) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        binary = self.binary or find_redis_server()
        self.port = self.port or free_port(self.host)
        workdir = self.log_dir / "redis-data"
        workdir.mkdir(parents=True, exist_ok=True)
        addresses = list(dict.fromkeys([LOOPBACK, self.host]))
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
            ]
        )
        self._wait_ready(self.ping, timeout, f"PING on {self.host}:{self.port}")
