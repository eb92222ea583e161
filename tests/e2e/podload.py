"""Bento pods created through the apiserver, a few at a time, with every answer kept.

For tests that change the injector under load (a replica stopped, killed,
rolled, its certificates rotated): a creation fails if the apiserver refuses
it, or if the pod comes back without the sidecar.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from devcluster import wait_for
from devcluster.control.api import Api


@dataclass
class Creation:
    started: float
    finished: float
    status: int
    injected: bool
    message: str = ""


@dataclass
class PodLoad:
    """Creates Bento pods through the apiserver, `concurrency` at a time, until stopped."""

    api: Api
    namespace: str
    concurrency: int = 4
    # Admitted and answered but never stored: on a cluster with a node the
    # pods would otherwise be scheduled and run.
    dry_run: bool = False
    results: list[Creation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> PodLoad:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(120)

    @property
    def failures(self) -> list[Creation]:
        return [c for c in self.results if not c.injected]

    def wait_more(self, count: int, timeout: float = 120) -> None:
        target = len(self.results) + count
        wait_for(lambda: len(self.results) >= target, timeout=timeout, what=f"{count} creations")

    def body(self) -> bytes:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": "llama-",
                "labels": {
                    "juicefs.bentoml.com/model-store": "juicefs",
                    "yatai.ai/bento-repository": "llama3-service",
                    "yatai.ai/bento-version": "v1",
                },
            },
            "spec": {"containers": [{"name": "main", "image": "us-docker.pkg.dev/p/r/llama:1"}]},
        }
        return json.dumps(pod).encode()

    async def _run(self) -> None:
        url = f"{self.api.server}/api/v1/namespaces/{self.namespace}/pods"
        if self.dry_run:
            url += "?dryRun=All"
        connector = aiohttp.TCPConnector(ssl=self.api.context, limit=self.concurrency)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def creator() -> None:
                while not self._stop.is_set():
                    started = time.monotonic()
                    try:
                        async with session.post(
                            url, data=self.body(), headers={"Content-Type": "application/json"}
                        ) as resp:
                            answer: dict[str, Any] = await resp.json(content_type=None)
                            status = resp.status
                    except (aiohttp.ClientError, TimeoutError) as err:
                        self.results.append(
                            Creation(started, time.monotonic(), 0, False, repr(err))
                        )
                        continue
                    init = (answer.get("spec") or {}).get("initContainers") or [{}]
                    injected = status == 201 and init[0].get("name") == "juicefs-mount"
                    message = "" if injected else str(answer.get("message") or answer)[:500]
                    self.results.append(
                        Creation(started, time.monotonic(), status, injected, message)
                    )

            await asyncio.gather(*(creator() for _ in range(self.concurrency)))
