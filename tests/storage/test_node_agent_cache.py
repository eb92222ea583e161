"""The node agent on real storage: JuiceFS 1.4.2 mounts, MinIO, Redis, a node cache directory.

Only the Kubernetes API is stood in for (`FakeNodeApi`: a Node's labels and
annotations, and the workloads to return); the e2e suite runs the agent as a
DaemonSet pod on the real node. Every model is warmed through the sidecar's
own streaming (read, sha256 against the manifest, cache completed), and what
MinIO served is counted from its own metrics.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.warm import WARM_ANNOTATION, BentoRef, NodeWarmth, is_warm_label
from devcluster.node.host import copied_bytes, local_copies_dir
from devcluster.storage.juicefs import cached_blocks
from devcluster.storage.minio_metrics import store_requests
from devcluster.storage.stack import MIB, StorageStack
from injector.config import InjectorConfig
from modelstore.manifest import Manifest, sha256_file
from nodeagent.agent import AgentOptions, NodeAgent
from nodeagent.warmer import AgentIdentity
from nodeagent.workloads import Workload

# The smallest budget the config allows: 1Gi, of which 0.9 (921 MiB) is
# filled. Any two of the three 320 MiB models fit; all three do not.
BUDGET = "1Gi"
SHARDS = [80 * MIB] * 4


@dataclass
class FakeNodeApi:
    """A Node's labels and annotations, the workloads the cluster has, the Events sent."""

    workloads_now: list[Workload] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    removed: list[tuple[int, str]] = field(default_factory=list)

    async def node(self) -> dict[str, Any]:
        return {"metadata": {"labels": dict(self.labels), "annotations": dict(self.annotations)}}

    async def workloads(self, config: InjectorConfig, node: Mapping[str, Any]) -> list[Workload]:
        return list(self.workloads_now)

    async def record(
        self, current_labels: Mapping[str, str], wanted_labels: Mapping[str, str], record: str
    ) -> None:
        self.labels = {k: v for k, v in self.labels.items() if not is_warm_label(k)}
        self.labels.update(wanted_labels)
        self.annotations[WARM_ANNOTATION] = record

    async def event(self, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))

    async def remove_taint(self, index: int, key: str) -> None:
        self.removed.append((index, key))

    async def watch_workloads(self, changed: Callable[[], None]) -> None:
        """These tests call reconcile() themselves: nothing changes behind their back."""

    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self.events]

    def warmth(self) -> NodeWarmth:
        return NodeWarmth.parse(self.annotations.get(WARM_ANNOTATION))


def workload(name: str, version: str, at: str) -> Workload:
    return Workload(
        namespace="serving",
        kind="Deployment",
        name=f"{name}-{version}",
        bento=BentoRef("models", name, version),
        bento_path=f"/bentos/{name}/{version}",
        models=(),
        changed_at=at,
    )


@dataclass
class Node:
    """One node's cache directory and agent settings over the shared storage stack."""

    stack: StorageStack
    root: Path
    api: FakeNodeApi = field(default_factory=FakeNodeApi)

    @property
    def config(self) -> InjectorConfig:
        return InjectorConfig.model_validate(
            {"cache": {"nodePath": str(self.root / "ssd"), "nodeBudget": BUDGET}}
        )

    @property
    def cache_dir(self) -> Path:
        return self.root / "ssd" / "models"

    def agent(self) -> NodeAgent:
        credentials = self.root / "credentials" / "models"
        credentials.mkdir(parents=True, exist_ok=True)
        for key, value in self.stack.credentials().items():  # the tenants' read-only ones
            (credentials / key).write_text(value)
        options = AgentOptions(
            credentials_dir=self.root / "credentials",
            work_dir=self.root / "work",
            juicefs_bin=str(self.stack.juicefs.binary),
            retry_seconds=0,
            evict_after_seconds=3600,
            disk_margin=0,  # the test's node cache shares the host's disk
        )
        identity = AgentIdentity("node-1", "agent-0", "bento-juicefs-system")
        return NodeAgent(self.config, options, identity, self.api)

    def cached(self) -> int:
        return sum(cached_blocks(self.cache_dir).values())

    def copied(self, staged: bool = False) -> int:
        return copied_bytes(local_copies_dir(self.root / "ssd", "models"), staged)

    def held(self) -> int:
        """What the node holds of every Bento: node cache blocks and local copies."""
        return self.cached() + self.copied()


@pytest.fixture(scope="module")
def models(stack: StorageStack, scratch: Path) -> dict[str, Manifest]:
    return {
        name: stack.publish_random(scratch, name, "v1", SHARDS)
        for name in ("agent-a", "agent-b", "agent-c")
    } | {"agent-a:v2": stack.publish_random(scratch, "agent-a", "v2", SHARDS)}


@pytest.fixture
def node(stack: StorageStack, tmp_path: Path) -> Iterator[Node]:
    yield Node(stack, tmp_path)
    shutil.rmtree(tmp_path / "ssd", ignore_errors=True)


def test_a_wanted_bento_is_warmed_verified_recorded_and_fetched_once(
    node: Node, models: dict[str, Manifest]
) -> None:
    model = models["agent-a"]
    node.api.workloads_now = [workload("agent-a", "v1", "2026-11-29T10:00:00Z")]
    before = store_requests(node.stack.store)
    agent = node.agent()
    asyncio.run(agent.reconcile())
    served = store_requests(node.stack.store) - before

    metric = agent.metrics.registry.get_sample_value
    assert metric("bento_juicefs_node_agent_verified_bytes_total") == model.total_bytes
    assert metric("bento_juicefs_node_agent_outcomes_total", {"outcome": "warm"}) == 1
    assert metric("bento_juicefs_node_cache_held_bytes") == model.total_bytes
    ref = BentoRef("models", "agent-a", "v1")
    record = node.api.warmth().records[ref]
    assert (record.state, record.verified, record.bytes) == ("warm", True, model.total_bytes)
    # The verified copy, served to a pod of every model, holds the published bytes...
    copy = agent.served_copy(ref, ())
    assert copy is not None
    for entry in model.files:
        assert sha256_file(copy / entry.path) == entry.sha256, entry.path
    assert node.api.labels == {"warm.juicefs.bentoml.com/agent-a.v1": "models"}
    assert node.api.reasons() == ["ModelWarming", "ModelWarm"]
    assert "from the object store" in node.api.events[-1][2]
    # ... and it is the node's one copy: no node cache block written beside it.
    assert node.cached() == 0
    assert node.copied() == model.total_bytes
    # Each block fetched once.
    print(f"MinIO served {served.bytes_sent / MIB:.1f} MiB in {served.gets} GETs "
          f"for a {model.total_bytes / MIB:.1f} MiB model")  # fmt: skip
    assert served.bytes_sent <= model.total_bytes * 1.05

    # The next pass finds it warm and fetches nothing.
    before = store_requests(node.stack.store)
    asyncio.run(node.agent().reconcile())
    assert (store_requests(node.stack.store) - before).bytes_sent < MIB
    assert node.api.reasons() == ["ModelWarming", "ModelWarm"]


def test_three_bentos_over_the_budget_the_newest_two_are_held(
    node: Node, models: dict[str, Manifest]
) -> None:
    size = models["agent-a"].total_bytes
    node.api.workloads_now = [
        workload("agent-a", "v1", "2026-11-29T08:00:00Z"),
        workload("agent-b", "v1", "2026-11-29T09:00:00Z"),
        workload("agent-c", "v1", "2026-11-29T10:00:00Z"),
    ]
    agent = node.agent()
    asyncio.run(agent.reconcile())
    warmth = node.api.warmth().records
    states = {ref.name: record.state for ref, record in warmth.items()}
    assert states == {"agent-c": "warm", "agent-b": "warm", "agent-a": "over-budget"}
    assert "does not fit" in warmth[BentoRef("models", "agent-a", "v1")].message
    assert node.held() <= agent.budget
    print(f"budget {agent.budget / MIB:.0f} MiB; held {node.held() / MIB:.0f} MiB "
          f"of three {size / MIB:.0f} MiB models")  # fmt: skip

    # agent-b's workload goes: its blocks make room for agent-a, the budget still holds.
    node.api.workloads_now = [
        workload("agent-a", "v1", "2026-11-29T08:00:00Z"),
        workload("agent-c", "v1", "2026-11-29T10:00:00Z"),
    ]
    asyncio.run(agent.reconcile())
    states = {ref.name: record.state for ref, record in node.api.warmth().records.items()}
    assert states == {"agent-c": "warm", "agent-b": "evicted", "agent-a": "warm"}
    assert "ModelEvicted" in node.api.reasons()
    assert node.held() <= agent.budget
    assert sorted(node.api.labels) == [
        "warm.juicefs.bentoml.com/agent-a.v1",
        "warm.juicefs.bentoml.com/agent-c.v1",
    ]


def test_a_new_version_is_warmed_and_the_old_one_evicted_once_unused_for_the_grace(
    node: Node, models: dict[str, Manifest]
) -> None:
    node.api.workloads_now = [workload("agent-a", "v1", "2026-11-29T08:00:00Z")]
    agent = node.agent()
    asyncio.run(agent.reconcile())
    node.api.workloads_now = [workload("agent-a", "v2", "2026-11-29T09:00:00Z")]
    asyncio.run(agent.reconcile())
    states = {ref.version: record.state for ref, record in node.api.warmth().records.items()}
    assert states == {"v1": "warm", "v2": "warm"}, "within the budget, the old one stays a while"

    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=agent.options.evict_after_seconds + 1)
    agent.clock = lambda: later
    asyncio.run(agent.reconcile())
    states = {ref.version: record.state for ref, record in node.api.warmth().records.items()}
    assert states == {"v1": "evicted", "v2": "warm"}
    assert list(node.api.labels) == ["warm.juicefs.bentoml.com/agent-a.v2"]
    v2 = models["agent-a:v2"].total_bytes
    assert node.held() <= v2 + 8 * MIB  # v2's copy and nothing of v1's
    copies = node.root / "ssd" / ".local-copies" / "models" / "agent-a"
    assert sorted(p.name for p in copies.iterdir()) == ["v2"]  # v1's copy went with it


def test_an_agent_restarted_mid_warm_resumes_without_fetching_again(
    node: Node, models: dict[str, Manifest]
) -> None:
    """A warm resumes from what its local copy holds: the files proven and kept, and the
    whole ranges written of the files in flight (all four at once here)."""
    model = models["agent-b"]
    node.api.workloads_now = [workload("agent-b", "v1", "2026-11-29T10:00:00Z")]
    before = store_requests(node.stack.store)

    async def interrupted() -> None:
        task = asyncio.ensure_future(node.agent().reconcile())
        while node.copied(staged=True) < model.total_bytes * 0.4:
            assert not task.done(), "finished before it could be interrupted"
            await asyncio.sleep(0.05)
        task.cancel()  # what SIGTERM does; the mount is unmounted on the way out
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    # Once the first agent is gone: what its copy holds, and what MinIO sent so far.
    held = node.copied(staged=True)
    restart = store_requests(node.stack.store)
    record = node.api.warmth().records[BentoRef("models", "agent-b", "v1")]
    assert record.state == "warming"
    assert not node.api.labels

    asyncio.run(node.agent().reconcile())  # a new agent process: its record from the Node
    done = store_requests(node.stack.store)
    record = node.api.warmth().records[BentoRef("models", "agent-b", "v1")]
    assert (record.state, record.verified) == ("warm", True)
    assert node.copied() == model.total_bytes
    assert node.copied(staged=True) == model.total_bytes, "nothing left staged"
    first, second = restart - before, done - restart
    missing = model.total_bytes - held
    print(
        f"interrupted with {held / MIB:.0f} MiB written (it had fetched "
        f"{first.bytes_sent / MIB:.0f} MiB: the rest was in flight); the next agent "
        f"fetched {second.bytes_sent / MIB:.0f} MiB for the {missing / MIB:.0f} MiB missing"
    )
    # The new agent fetches what the copy lacks, not the model again: at most a
    # range (one 4 MiB block) more per file, the one being written at the stop.
    assert second.bytes_sent <= missing + len(model.files) * 4 * MIB + MIB
    assert json.loads(node.api.annotations[WARM_ANNOTATION])[0]["verified"] is True


def test_the_budget_is_held_to_a_small_disk_with_a_margin_kept_free(tmp_path: Path) -> None:
    """A real 100 MiB tmpfs as the node cache's disk, under a configured 1 GiB budget."""
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(ssd)], check=True)
    try:
        (ssd / "other-pod-data").write_bytes(b"\0" * (30 * MIB))  # what others wrote
        api = FakeNodeApi()
        config = InjectorConfig.model_validate(
            {"cache": {"nodePath": str(ssd), "nodeBudget": "1Gi"}}
        )
        options = AgentOptions(credentials_dir=tmp_path, work_dir=tmp_path, prewarm=False)
        identity = AgentIdentity("node-1", "agent-0", "bento-juicefs-system")
        agent = NodeAgent(config, options, identity, api)
        asyncio.run(agent.reconcile())
        # 70 MiB free, 20 MiB of the disk kept free: 50 MiB for the cache.
        assert agent.budget == 50 * MIB
        [(kind, reason, message)] = api.events
        assert (kind, reason) == ("Warning", "NodeBudgetCapped")
        assert "is held to 50 MiB" in message
        assert "20% of it stays free" in message
        asyncio.run(agent.reconcile())
        assert len(api.events) == 1, "said once, not every pass"
    finally:
        subprocess.run(["umount", "-l", str(ssd)], check=False)
