"""The node cache over a real JuiceFS mount: two pods share one model's blocks; the budget holds.

Each "pod" is what the sidecar runs in node mode: `JuiceFSMount` with the
same node cache directory (the hostPath every pod of the volume on a node
mounts), streamed and verified by `sidecar.run.warm`, whose ModelsReady
Event says where the bytes came from. MinIO's own request counters say how
many GETs it answered.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import pytest

from devcluster.juicefs import cached_blocks, wait_cached
from devcluster.storage import MIB, StorageStack
from devcluster.storemetrics import store_requests
from injector.config import InjectorConfig
from modelstore.manifest import Manifest
from modelstore.mount import JuiceFSMount
from modelstore.sources import MountCounters
from sidecar.decisions import CachePlan, gate_plan
from sidecar.env import Settings
from sidecar.reporter import Reporter
from sidecar.run import open_gate

SCAN_SECONDS = 2
FILL_RATIO = InjectorConfig().juicefs.cache_fill_ratio
READY = re.compile(
    r"(?P<cache>\d+) MiB \((?P<percent>[\d.]+)%\) from the node cache, "
    r"(?P<store>\d+) MiB from the object store \((?P<gets>\d+) GETs\)"
)


class RecordingReporter:
    """Events and conditions, in order (stands in for the agent reporter; no apiserver here)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.conditions: list[tuple[str, str]] = []

    async def event(self, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))

    async def set_condition(
        self, status: str, reason: str, message: str, attempts: int | None = 8
    ) -> None:
        self.conditions.append((status, reason))

    def message(self, reason: str) -> str:
        return next(m for _, r, m in self.events if r == reason)


def node_settings(
    stack: StorageStack, work: Path, node_cache: Path, name: str, budget_mib: int
) -> Settings:
    """A pod's sidecar settings in node mode, as the injector writes them (scan shortened)."""
    return replace(
        stack.sidecar_settings(work / name, name, "v1"),
        cache_dir=node_cache,
        cache_mode="node",
        cache_size_mib=int(budget_mib * FILL_RATIO),
        node_cache_budget_mib=budget_mib,
        cache_scan_seconds=SCAN_SECONDS,
    )


@dataclass
class Pod:
    """One sidecar: its mount, stays mounted until stopped, and what it reported."""

    settings: Settings
    mount: JuiceFSMount = field(init=False)
    reporter: RecordingReporter = field(default_factory=RecordingReporter)
    ready: bool = False
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.mount = JuiceFSMount(self.settings.mount_spec())

    async def start(self) -> Pod:
        await self.mount.start()
        started = time.monotonic()
        reporter = cast(Reporter, self.reporter)
        gate = gate_plan(True, CachePlan(self.settings.cache_size_mib))
        await open_gate(self.settings, self.mount, reporter, gate, MountCounters(self.mount))
        self.seconds = time.monotonic() - started
        self.ready = ("True", "ModelsCached") in self.reporter.conditions
        return self

    def sources(self) -> tuple[int, float, int, int]:
        """(MiB from the node cache, its percent, MiB from the store, GETs) from ModelsReady."""
        found = READY.search(self.reporter.message("ModelsReady"))
        assert found, self.reporter.events
        return (
            int(found["cache"]),
            float(found["percent"]),
            int(found["store"]),
            int(found["gets"]),
        )


async def stop_all(pods: list[Pod]) -> None:
    for pod in pods:
        await pod.mount.stop()


def dir_bytes(path: Path) -> int:
    """Bytes of every file under path: the blocks, their checksums, files being written."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue  # evicted, or renamed from .tmp, while we looked
    return total


class Sampler:
    """The node cache directory's size every 20 ms, in a thread, for as long as it runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dir-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, dir_bytes(self.path))
            self.samples += 1
            self._stop.wait(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def node_cache(tmp_path: Path) -> Iterator[Path]:
    """The node cache directory of volume `models` (as the hostPath <nodePath>/models)."""
    path = tmp_path / "node" / "local-ssd" / "models"
    yield path
    shutil.rmtree(tmp_path / "node", ignore_errors=True)


SHARED_SHARDS = [64 * MIB] * 4


@pytest.fixture(scope="session")
def shared_model(stack: StorageStack, scratch: Path) -> Manifest:
    return stack.publish_random(scratch, "llm-shared", "v1", SHARED_SHARDS)


def test_a_second_pod_on_the_node_reads_the_model_from_the_node_cache(
    stack: StorageStack, shared_model: Manifest, node_cache: Path, tmp_path: Path
) -> None:
    blocks = len(stack.block_keys(shared_model, "llm-shared", "v1"))
    budget = 1024

    async def scenario() -> tuple[Pod, Pod, int, int]:
        first = Pod(node_settings(stack, tmp_path, node_cache, "llm-shared", budget))
        second = Pod(replace(first.settings, mount_point=tmp_path / "b" / "mnt",
                             private_mount=tmp_path / "b" / "volume"))  # fmt: skip
        before = await asyncio.to_thread(store_requests, stack.store)
        try:
            await first.start()
            # juicefs writes fetched blocks to its cache in the background.
            await asyncio.to_thread(wait_cached, node_cache, shared_model.total_bytes)
            between = await asyncio.to_thread(store_requests, stack.store)
            await second.start()  # the first one still runs, as in a scale from 1 to 2
            after = await asyncio.to_thread(store_requests, stack.store)
        finally:
            await stop_all([first, second])
        return first, second, (between - before).gets, (after - between).gets

    first, second, first_gets, second_gets = asyncio.run(scenario())
    assert first.ready, first.reporter.events
    assert second.ready, second.reporter.events
    cold, warm_ = first.sources(), second.sources()
    total_mib = shared_model.total_bytes / MIB
    mb_per_s = [shared_model.total_bytes / MIB / pod.seconds for pod in (first, second)]
    print(
        f"\nmodel {total_mib:.0f} MiB in {blocks} block objects\n"
        f"first pod:  {cold[0]} MiB ({cold[1]}%) from the node cache, {cold[2]} MiB from the "
        f"store; juicefs {cold[3]} GETs, MinIO {first_gets} GETs; {first.seconds:.2f}s "
        f"({mb_per_s[0]:.0f} MB/s)\n"
        f"second pod: {warm_[0]} MiB ({warm_[1]}%) from the node cache, {warm_[2]} MiB from the "
        f"store; juicefs {warm_[3]} GETs, MinIO {second_gets} GETs; {second.seconds:.2f}s "
        f"({mb_per_s[1]:.0f} MB/s, read and hashed from local disk)\n"
        f"MinIO GETs per block object over both pods: {(first_gets + second_gets) / blocks:.2f}"
    )
    assert warm_[1] >= 95.0
    assert cold[1] <= 5.0, "the first pod found a cache it cannot have had"
    # Each block fetched about once: by the first pod; the second fetched (almost) none.
    assert blocks <= first_gets + second_gets <= blocks * 1.1 + 2
    assert second_gets <= 0.05 * blocks + 2
    # Both pods verified every byte against the manifest (ModelsReady says so).
    for pod in (first, second):
        assert f"{len(shared_model.files)} files verified" in pod.reporter.message("ModelsReady")


BUDGET_MIB = 160
MODEL_SHARDS = [40 * MIB] * 2  # + metadata: each model ~80 MiB, the three ~240 MiB
BUDGETED = ("llm-node-a", "llm-node-b", "llm-node-c")


@pytest.fixture(scope="session")
def three_models(stack: StorageStack, scratch: Path) -> dict[str, Manifest]:
    return {name: stack.publish_random(scratch, name, "v1", MODEL_SHARDS) for name in BUDGETED}


def model_blocks(stack: StorageStack, manifest: Manifest, name: str) -> set[str]:
    return {key.rsplit("/", 1)[1] for key in stack.block_keys(manifest, name, "v1")}


def test_the_node_budget_holds_for_three_models_started_one_after_another(
    stack: StorageStack, three_models: dict[str, Manifest], node_cache: Path, tmp_path: Path
) -> None:
    budget = BUDGET_MIB * MIB
    together = sum(m.total_bytes for m in three_models.values())
    assert together > budget * 1.4

    async def scenario() -> list[tuple[str, int]]:
        pods: list[Pod] = []
        after_each: list[tuple[str, int]] = []
        try:
            for name in BUDGETED:
                pod = Pod(node_settings(stack, tmp_path, node_cache, name, BUDGET_MIB))
                pods.append(await pod.start())
                assert pod.ready, pod.reporter.events
                await asyncio.sleep(1)  # juicefs's cache writes land
                after_each.append((name, dir_bytes(node_cache)))
            return after_each
        finally:
            await stop_all(pods)

    with Sampler(node_cache) as sampler:
        after_each = asyncio.run(scenario())
    print(
        f"\nbudget {BUDGET_MIB} MiB (juicefs --cache-size {int(BUDGET_MIB * FILL_RATIO)} MiB), "
        f"three models {together / MIB:.0f} MiB together, started one after another: "
        + ", ".join(f"after {name} {size / MIB:.1f} MiB" for name, size in after_each)
        + f"; peak {sampler.peak / MIB:.1f} MiB over {sampler.samples} samples"
    )
    assert sampler.samples > 50
    assert sampler.peak <= budget
    # The newest model is whole in the cache; room was made by evicting older blocks.
    newest = BUDGETED[-1]
    cached = set(cached_blocks(node_cache))
    assert model_blocks(stack, three_models[newest], newest) <= cached
    oldest = BUDGETED[0]
    assert not model_blocks(stack, three_models[oldest], oldest) <= cached


def test_the_node_budget_holds_again_one_scan_after_three_models_fill_at_once(
    stack: StorageStack, three_models: dict[str, Manifest], node_cache: Path, tmp_path: Path
) -> None:
    budget = BUDGET_MIB * MIB

    async def scenario() -> tuple[float, list[int]]:
        pods = [
            Pod(node_settings(stack, tmp_path, node_cache, name, BUDGET_MIB)) for name in BUDGETED
        ]
        try:
            await asyncio.gather(*(pod.start() for pod in pods))
            filled = time.monotonic()
            assert all(pod.ready for pod in pods)
            sizes = []
            # Each client re-reads the directory every SCAN_SECONDS and evicts down to its limit.
            while time.monotonic() - filled < 3 * SCAN_SECONDS + 2:
                sizes.append(dir_bytes(node_cache))
                if sizes[-1] <= budget and time.monotonic() - filled > SCAN_SECONDS:
                    break
                await asyncio.sleep(0.2)
            return time.monotonic() - filled, sizes
        finally:
            await stop_all(pods)

    with Sampler(node_cache) as sampler:
        settled, sizes = asyncio.run(scenario())
    print(
        f"\nbudget {BUDGET_MIB} MiB, three models filling at once: peak "
        f"{sampler.peak / MIB:.1f} MiB, {sizes[-1] / MIB:.1f} MiB {settled:.1f}s after the "
        f"fills finished (scan every {SCAN_SECONDS}s)"
    )
    assert sizes[-1] <= budget, f"still {sizes[-1] / MIB:.1f} MiB after {settled:.1f}s"
    assert settled <= 3 * SCAN_SECONDS + 2
