"""The storage the scenarios run against: MinIO behind a shaped link, Redis unshaped.

    with ShapedStorage(work) as storage:             # nodes=[NodeNetwork...] for nodes' pods
        storage.shaper.apply(LinkProfile(200))
        before = storage.counters()
        ...
        used = storage.counters() - before          # GETs and bytes MinIO served

MinIO runs in its own network namespace (`devcluster.storage.shaped_link`); Redis, the
JuiceFS metadata engine, listens on the host as usual (loopback, or the
node's host address for a node's pods). The counters are MinIO's own
(`devcluster.storage.minio_metrics`: its v3 request metrics).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Self

from devcluster.node.netns import NodeNetwork
from devcluster.storage.minio import ObjectStore
from devcluster.storage.minio_metrics import StoreRequests, store_requests
from devcluster.storage.service import LOOPBACK
from devcluster.storage.shaped_link import STORE_PORT, LinkProfile, Shaper, StoreNetwork
from devcluster.storage.stack import StorageStack


@contextmanager
def interrupts_as_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run like Ctrl-C, so every `finally` clean-up runs."""

    def stop(signum: int, _: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ShapedStorage:
    """StoreNetwork + MinIO inside it + Redis + a JuiceFS volume, and the link's Shaper."""

    def __init__(
        self,
        work_dir: Path,
        *,
        redis_host: str = LOOPBACK,
        nodes: Sequence[NodeNetwork] = (),
        net: StoreNetwork | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.net = net or StoreNetwork()
        # The nodes whose pods reach the store: a shaped link each, all alike.
        self.nodes = list(nodes)
        logs = self.work_dir / "logs"
        self.store = ObjectStore(
            self.work_dir / "minio-data",
            logs,
            host=self.net.store_ip,
            port=STORE_PORT,
            netns=self.net.netns,
        )
        self.stack = StorageStack(self.work_dir, host=redis_host, store=self.store)
        self.shaper = Shaper(self.net, logs)

    def start(self) -> Self:
        try:
            self.net.create()
            for index, node in enumerate(self.nodes):
                self.net.link_node(node, index)
            self.stack.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Everything goes: relay, qdiscs, mounts, MinIO, Redis, veths, the namespace."""
        try:
            self.shaper.clear()
            self.stack.stop()
            self.store.stop()  # ours: the stack stops only a store it made
        finally:
            self.net.delete()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def shape(self, profile: LinkProfile | None) -> None:
        self.shaper.apply(profile)

    def counters(self) -> StoreRequests:
        deadline = time.monotonic() + 30
        while True:
            try:
                return store_requests(self.store, timeout=10)
            except OSError:  # MinIO busy serving a shaped pass: ask again
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
