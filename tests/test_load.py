"""/mutate under concurrent load over TLS: every review answered, none failed.

The CI-sized version of `make bench-load` (benchmarks/load.py: 10,000
reviews from wrk at high concurrency, with the server's memory before and
after). Here 2,000 reviews of distinct pods over 100 connections, in two
ways: kept-alive connections, and a new connection (a full TLS handshake)
for every review. Nothing about time is asserted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common.ports import free_port, port_answers
from injector.config import parse_config
from injector.server import serve
from tests.helpers import bento_pod

REVIEWS = 2_000
CONNECTIONS = 100


def review(index: int) -> bytes:
    pod = bento_pod(name=f"llama-{index}")
    pod["metadata"]["labels"]["load-variant"] = str(index)
    request = {
        "uid": f"00000000-0000-4000-8000-{index:012d}",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE",
        "namespace": "serving",
        "object": pod,
    }
    return json.dumps(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    ).encode()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[str, ssl.SSLContext]]:
    port = free_port()
    cert_dir = tmp_path / "certs"
    config = parse_config(
        {
            "server": {
                "host": "127.0.0.1",
                "port": port,
                "certDir": str(cert_dir),
                "shutdownDelaySeconds": 0,
            }
        }
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, standalone=True, stop=stop))
    for _ in range(400):
        if (cert_dir / "ca.crt").exists() and port_answers(port):
            break
        await asyncio.sleep(0.025)
    else:
        pytest.fail("the server never started listening")
    yield f"https://127.0.0.1:{port}", ssl.create_default_context(cafile=str(cert_dir / "ca.crt"))
    stop.set()
    await task


async def load(url: str, context: ssl.SSLContext, *, keep_alive: bool) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(ssl=context, limit=CONNECTIONS, force_close=not keep_alive)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(REVIEWS):
        queue.put_nowait(index)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            try:
                async with session.post(
                    url + "/mutate",
                    data=review(index),
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    if resp.status != 200:
                        outcomes[f"HTTP {resp.status}"] += 1
                        continue
                    answer: dict[str, Any] = (await resp.json())["response"]
            except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as err:
                outcomes[type(err).__name__] += 1
                continue
            ops = json.loads(base64.b64decode(answer.get("patch", "")) or b"[]")
            if answer["uid"].endswith(f"{index:012d}") and answer["allowed"] and ops:
                outcomes["injected"] += 1
            else:
                outcomes["wrong answer"] += 1

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONNECTIONS)))
    return outcomes


@pytest.mark.parametrize("keep_alive", [True, False], ids=["kept-alive", "handshake-each"])
async def test_every_review_under_load_is_answered(
    server: tuple[str, ssl.SSLContext], keep_alive: bool
) -> None:
    url, context = server
    outcomes = await load(url, context, keep_alive=keep_alive)
    assert outcomes == Counter({"injected": REVIEWS})
