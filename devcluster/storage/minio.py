"""MinIO, the object store JuiceFS keeps its blocks in: the admin and read-only users.

    with ObjectStore(tmp / "minio", tmp / "logs") as store:
        store.s3.put_object(store.bucket, "key", b"bytes")
        store.grant_read("reader", "reader-secret", "models")  # GET/LIST under models/ only

The admin (MinIO's root user) is the publisher's; readers (a MinIO user with
a read-only policy on one volume's prefix) are what tenants get. No
anonymous writes.

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
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from common.ports import free_port, port_answers
from devcluster.storage.s3 import S3Client, S3Error
from devcluster.storage.service import LOOPBACK, Service, StorageError, storage_binaries

# The admin's (publisher's) keys: MinIO's root user. Fixed development values.
ACCESS_KEY = "bento-juicefs"
SECRET_KEY = "bento-juicefs-secret-key"
BUCKET = "juicefs"


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
