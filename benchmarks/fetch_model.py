"""The cold-start baseline: download the whole model from the object store, then start the app.

What a user without the injector does today, at its best: an init container
that GETs every file of the model with parallel ranged requests (like
`s5cmd cp` or `aws s3 cp` with multipart download), writes it into an
emptyDir, and only then lets the app container start. Standard library
only, so it runs in the Bento's own image (python3):

    python3 fetch_model.py SPEC.json

SPEC: {"endpoint": "http://host:port", "bucket": ..., "dest": DIR,
"connections": 16, "range_bytes": 8388608, "files": [{"key", "path", "size"}]}.
The objects are read anonymously (the benchmark's bucket policy allows
GetObject on their prefix): request signing is not what this measures.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

Job = tuple[int, str, int, int]  # descriptor, URL path, offset, length


def ranges(size: int, step: int) -> list[tuple[int, int]]:
    """(offset, length) of each ranged GET of a file; one empty GET for an empty file."""
    return [(offset, min(step, size - offset)) for offset in range(0, max(size, 1), step)]


def open_files(spec: dict[str, Any]) -> tuple[list[int], list[Job]]:
    """Each file created at its size under dest; its descriptor and its ranged GETs."""
    dest = Path(spec["dest"])
    step = int(spec["range_bytes"])
    jobs: list[Job] = []
    descriptors = []
    for entry in spec["files"]:
        path = dest / entry["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, int(entry["size"]))
        descriptors.append(fd)
        url = f"/{spec['bucket']}/{entry['key']}"
        jobs.extend(
            (fd, url, offset, length) for offset, length in ranges(int(entry["size"]), step)
        )
    return descriptors, jobs


def get_range(conn: http.client.HTTPConnection, job: Job) -> None:
    """GET one range and write it in place; OSError when the store answers otherwise."""
    fd, url, offset, length = job
    headers = {"Range": f"bytes={offset}-{offset + length - 1}"} if length else {}
    conn.request("GET", url, headers=headers)
    response = conn.getresponse()
    data = response.read()
    if response.status not in (200, 206) or len(data) != length:
        raise OSError(f"GET {url} {headers}: HTTP {response.status}, {len(data)} B")
    os.pwrite(fd, data, offset)


def fetch(spec: dict[str, Any]) -> int:
    endpoint = urllib.parse.urlsplit(spec["endpoint"])
    descriptors, jobs = open_files(spec)
    jobs.reverse()
    lock = threading.Lock()
    failures: list[str] = []
    total = 0

    def worker() -> None:
        nonlocal total
        conn = http.client.HTTPConnection(endpoint.hostname, endpoint.port, timeout=120)
        while True:
            with lock:
                if not jobs or failures:
                    return
                job = jobs.pop()
            try:
                get_range(conn, job)
            except (OSError, http.client.HTTPException) as err:
                with lock:
                    failures.append(str(err))
                return
            with lock:
                total += job[3]

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(int(spec["connections"]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for fd in descriptors:
        os.close(fd)
    seconds = time.monotonic() - started
    if failures:
        print(f"download failed: {failures[0]}", file=sys.stderr, flush=True)
        return 1
    print(
        f"downloaded {total} bytes in {len(spec['files'])} files in {seconds:.2f}s "
        f"({total / (1 << 20) / max(seconds, 1e-9):.1f} MiB/s)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(fetch(json.loads(Path(sys.argv[1]).read_text())))
