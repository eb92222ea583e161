"""A small S3 client (path-style, AWS Signature Version 4) and a parallel-GET benchmark.

Standard library only (hmac, hashlib, http.client): enough to create a
bucket, PUT/GET/LIST/DELETE/copy objects on MinIO (and check which of them a
read-only user is denied) and measure what the object store gives without
JuiceFS or FUSE in the way.

    s3 = S3Client("http://127.0.0.1:9000", "access", "secret")
    s3.put_object("bucket", "key", b"bytes")
    read_objects(s3, "bucket", keys, concurrency=8).mb_per_s
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

REGION = "us-east-1"
MIB = 1 << 20
_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class S3Error(RuntimeError):
    """An S3 request was answered with an unexpected HTTP status."""

    def __init__(self, what: str, status: int, body: bytes) -> None:
        super().__init__(f"S3 {what}: HTTP {status}: {body[:500].decode(errors='replace')}")
        self.status = status
        self.body = body


def _quote(value: str, safe: str = "-_.~") -> str:
    return urllib.parse.quote(value, safe=safe)


def _query_string(query: Mapping[str, str] | None) -> str:
    return "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted((query or {}).items()))


class S3Client:
    """Path-style S3 requests signed with AWS Signature Version 4.

    One HTTP connection per thread, so one client can be shared by threads.
    """

    def __init__(
        self, endpoint: str, access_key: str, secret_key: str, region: str = REGION
    ) -> None:
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
        extra: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """The headers that authenticate one request (path not yet URL-encoded).

        `extra` headers (e.g. x-amz-copy-source) are sent and signed too.
        """
        stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        payload_hash = hashlib.sha256(payload).hexdigest()
        headers = {k.lower(): v for k, v in (extra or {}).items()}
        headers |= {"host": self.host, "x-amz-content-sha256": payload_hash, "x-amz-date": stamp}
        names = sorted(headers)
        canonical = "\n".join(
            [
                method,
                _quote(path, safe="/-_.~"),
                _query_string(query),
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
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """(status, body); with `sink`, a 200 body is streamed to it instead (body is b"")."""
        signed = self.signed_headers(method, path, query, payload, extra=headers)
        url = _quote(path, safe="/-_.~")
        if query:
            url += "?" + _query_string(query)
        for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
            conn = self._connection()
            try:
                conn.request(method, url, body=payload or None, headers=signed)
                resp = conn.getresponse()
                if sink is not None and resp.status == 200:
                    while chunk := resp.read(MIB):
                        sink(chunk)
                    return resp.status, b""
                return resp.status, resp.read()
            except (http.client.HTTPException, ConnectionError):
                conn.close()  # the next request on it reconnects
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _expect(self, reply: tuple[int, bytes], what: str, ok: Sequence[int] = (200,)) -> bytes:
        status, body = reply
        if status not in ok:
            raise S3Error(what, status, body)
        return body

    def create_bucket(self, bucket: str) -> None:
        status, body = self.request("PUT", f"/{bucket}")
        if status == 409 and b"BucketAlreadyOwnedByYou" in body:
            return
        self._expect((status, body), f"create bucket {bucket}")

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        self._expect(self.request("PUT", f"/{bucket}/{key}", payload=data), f"PUT {bucket}/{key}")

    def get_object(self, bucket: str, key: str) -> bytes:
        return self._expect(self.request("GET", f"/{bucket}/{key}"), f"GET {bucket}/{key}")

    def delete_object(self, bucket: str, key: str) -> None:
        what = f"DELETE {bucket}/{key}"
        self._expect(self.request("DELETE", f"/{bucket}/{key}"), what, ok=(204,))

    def copy_object(self, bucket: str, key: str, source: str) -> None:
        """CopyObject: key becomes a copy of source (`bucket/key`), server side."""
        copy = {"x-amz-copy-source": _quote(f"/{source}", safe="/-_.~")}
        reply = self.request("PUT", f"/{bucket}/{key}", headers=copy)
        self._expect(reply, f"copy {source} to {bucket}/{key}")

    def list_objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """key -> size for every object under prefix (ListObjectsV2, all pages)."""
        found: dict[str, int] = {}
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
            if token:
                query["continuation-token"] = token
            body = self._expect(self.request("GET", f"/{bucket}", query), f"list {bucket}")
            root = ET.fromstring(body)
            for item in root.iter(f"{_S3_NS}Contents"):
                found[item.findtext(f"{_S3_NS}Key", "")] = int(item.findtext(f"{_S3_NS}Size", "0"))
            if root.findtext(f"{_S3_NS}IsTruncated") != "true":
                return found
            token = root.findtext(f"{_S3_NS}NextContinuationToken")


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
    """GET every key with `concurrency` parallel connections, counting and discarding the bytes."""
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
            raise S3Error(f"GET {bucket}/{key}", status, body)
        with lock:
            total += got

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3-get") as pool:
            list(pool.map(fetch, keys))
    finally:
        s3.close()
    return ReadResult(total, time.perf_counter() - started, len(keys), concurrency)
