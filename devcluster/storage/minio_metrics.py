"""What MinIO served, from its own Prometheus metrics: GET requests and bytes sent.

    before = store_requests(stack.store)
    ...                                         # mount, stream
    served = store_requests(stack.store) - before
    served.gets                                 # GetObject requests MinIO answered

MinIO runs with `MINIO_PROMETHEUS_AUTH_TYPE=public` (devcluster.storage.minio), so
no token is needed. The v3 API metrics (`/minio/metrics/v3/api/requests`)
are counted as requests are served; the v2 cluster endpoint caches its
numbers for several seconds.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass

from devcluster.storage.minio import ObjectStore

REQUESTS_PATH = "/minio/metrics/v3/api/requests"
_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")


@dataclass(frozen=True)
class StoreRequests:
    gets: int
    bytes_sent: int

    def __sub__(self, other: StoreRequests) -> StoreRequests:
        return StoreRequests(self.gets - other.gets, self.bytes_sent - other.bytes_sent)


def parse_requests(text: str) -> StoreRequests:
    """GetObject requests and bytes sent (every API) from MinIO's v3 request metrics."""
    gets = sent = 0.0
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        if match["name"] == "minio_api_requests_total" and 'name="GetObject"' in (
            match["labels"] or ""
        ):
            gets += float(match["value"])
        elif match["name"] == "minio_api_requests_traffic_sent_bytes":
            sent += float(match["value"])
    return StoreRequests(int(gets), int(sent))


def store_requests(store: ObjectStore, timeout: float = 5.0) -> StoreRequests:
    with urllib.request.urlopen(store.endpoint + REQUESTS_PATH, timeout=timeout) as response:
        text: str = response.read().decode()
    return parse_requests(text)
