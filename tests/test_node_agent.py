"""The node agent's decisions: which Bentos a node holds, what fits, what goes, what it records."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import nodeagent.agent as agent_module
from common.diskspace import DiskSpace
from common.warm import (
    STARTUP_TAINT,
    WARM_ANNOTATION,
    WARM_LABEL_PREFIX,
    BentoRef,
    NodeWarmth,
    WarmRecord,
    warm_label_key,
)
from injector.config import InjectorConfig
from modelstore.mount import JuiceFSMount
from nodeagent.agent import AgentOptions, NodeAgent, woken
from nodeagent.kube import node_patch
from nodeagent.metrics import AgentMetrics
from nodeagent.plan import (
    Settled,
    disk_budget,
    expired,
    forgettable,
    make_room,
    needs_warming,
    parse_timestamp,
    ready_since,
    retry_due,
    spec_changed,
    startup_settled,
    taint_index,
    track_unreferenced,
)
from nodeagent.warmer import (
    AgentIdentity,
    Credentials,
    CredentialsError,
    mount_spec,
    read_credentials,
)
from nodeagent.workloads import (
    Workload,
    changed_at,
    serving,
    template_fits_node,
    wanted_bentos,
    workload_bento,
)
from tests.helpers import bento_pod

GIB = 1 << 30
NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


def deployment(
    name: str = "llama",
    version: str = "v1",
    namespace: str = "serving",
    annotations: dict[str, str] | None = None,
    times: tuple[str, ...] = ("2026-11-29T10:00:00Z",),
) -> dict[str, Any]:
    pod = bento_pod()
    labels = pod["metadata"]["labels"]
    labels["yatai.ai/bento-repository"] = name
    labels["yatai.ai/bento-version"] = version
    return {
        "metadata": {
            "name": f"{name}-{version}",
            "namespace": namespace,
            "creationTimestamp": "2026-11-28T00:00:00Z",
            "managedFields": [{"manager": "helm", "time": t} for t in times]
            + [
                {
                    "manager": "kube-controller-manager",
                    "subresource": "status",
                    "time": "2026-11-29T11:59:00Z",
                }
            ],
        },
        "spec": {
            "template": {
                "metadata": {"labels": labels, "annotations": annotations or {}},
                "spec": pod["spec"],
            }
        },
    }


def ref(name: str, version: str = "v1", volume: str = "models") -> BentoRef:
    return BentoRef(volume, name, version)


def record(
    bento: BentoRef, state: str = "warm", size: int = GIB, at: str = "2026-11-29T10:00:00Z"
) -> WarmRecord:
    return WarmRecord(bento=bento, state=state, bytes=size, verified=state == "warm", at=at)  # type: ignore[arg-type]


# Which workloads count: the injector's own decision on the template.


def test_a_bento_deployment_is_wanted_with_the_injectors_volume_and_path() -> None:
    workload = workload_bento(deployment(), "Deployment", InjectorConfig())
    assert not isinstance(workload, str)
    assert workload.bento == ref("llama")
    assert workload.bento_path == "/bentos/llama/v1"
    assert workload.models == ()
    assert str(workload) == "Deployment serving/llama-v1"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (
            lambda d: d["spec"]["template"]["metadata"]["labels"].pop(
                "juicefs.bentoml.com/model-store"
            ),
            "lacks label",
        ),
        (
            lambda d: d["spec"]["template"]["metadata"]["labels"].update(
                {"juicefs.bentoml.com/inject": "false"}
            ),
            "opted out",
        ),
        (
            lambda d: d["spec"]["template"]["metadata"]["annotations"].update(
                {"juicefs.bentoml.com/cache-mode": "pod"}
            ),
            "pod cache",
        ),
        (
            lambda d: d["spec"]["template"]["metadata"]["annotations"].update(
                {"juicefs.bentoml.com/volume": "../etc"}
            ),
            "would be denied",
        ),
        (lambda d: d["metadata"].update({"namespace": "kube-system"}), "never mutated"),
    ],
    ids=["unmarked", "opted-out", "pod-cache", "bad-volume", "system-namespace"],
)
def test_workloads_the_injector_would_not_give_a_node_cache_are_not_wanted(
    change: Any, why: str
) -> None:
    obj = deployment()
    change(obj)
    result = workload_bento(obj, "Deployment", InjectorConfig())
    assert isinstance(result, str)
    assert why in result


def test_the_last_spec_change_is_the_newest_non_status_managed_field() -> None:
    obj = deployment(times=("2026-11-29T09:00:00Z", "2026-11-29T10:30:00Z"))
    assert changed_at(obj) == "2026-11-29T10:30:00Z"
    del obj["metadata"]["managedFields"]
    assert changed_at(obj) == "2026-11-28T00:00:00Z"


def test_newest_first_one_entry_per_bento_with_the_union_of_models() -> None:
    config = InjectorConfig()
    old = deployment("old", times=("2026-11-29T08:00:00Z",))
    new = deployment(
        "new", times=("2026-11-29T11:00:00Z",), annotations={"juicefs.bentoml.com/models": "llm:v1"}
    )
    new_too = deployment(
        "new",
        times=("2026-11-29T09:00:00Z",),
        annotations={"juicefs.bentoml.com/models": "tokenizer"},
    )
    new_too["metadata"]["name"] = "new-canary"
    everything = deployment("old", times=("2026-11-29T07:00:00Z",))
    everything["metadata"]["name"] = "old-b"
    items = [workload_bento(o, "Deployment", config) for o in (old, new, new_too, everything)]
    wanted = wanted_bentos(w for w in items if not isinstance(w, str))
    assert [w.bento.name for w in wanted] == ["new", "old"]
    assert wanted[0].models == ("llm:v1", "tokenizer")
    assert wanted[0].changed_at == "2026-11-29T11:00:00Z"
    assert wanted[0].workloads == ("Deployment serving/new-canary", "Deployment serving/new-v1")
    assert wanted[1].models == ()  # any workload wanting every model wins


def test_a_workload_scaled_to_zero_is_wanted_only_within_the_grace() -> None:
    config = InjectorConfig()

    def scaled(count: int | None, at: str) -> Workload:
        obj = deployment(times=(at,))
        if count is not None:
            obj["spec"]["replicas"] = count
        workload = workload_bento(obj, "Deployment", config)
        assert isinstance(workload, Workload)
        return workload

    running = scaled(3, "2026-11-01T00:00:00Z")
    defaulted = scaled(None, "2026-11-01T00:00:00Z")
    just_scaled_down = scaled(0, "2026-11-29T11:30:00Z")  # 30 min before NOW
    long_idle = scaled(0, "2026-11-29T10:00:00Z")  # 2 h before NOW
    assert (running.replicas, defaulted.replicas, long_idle.replicas) == (3, 1, 0)
    kept = serving([running, defaulted, just_scaled_down, long_idle], NOW, 3600)
    assert kept == [running, defaulted, just_scaled_down]
    assert serving([long_idle], NOW, 3 * 3600) == [long_idle]


def a_node(
    labels: dict[str, str], name: str = "gpu-1", taints: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints or []}}


def test_a_node_selector_that_excludes_the_node_excludes_the_workload() -> None:
    template = {"spec": {"nodeSelector": {"pool": "a100"}}}
    assert template_fits_node(template, a_node({"pool": "a100", "x": "y"}))
    assert not template_fits_node(template, a_node({"pool": "l4"}))
    assert template_fits_node({"spec": {}}, a_node({}))


def required(*terms: dict[str, Any]) -> dict[str, Any]:
    affinity = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}
    return {"spec": {"affinity": {"nodeAffinity": affinity}}}


def test_required_node_affinity_is_read_as_the_scheduler_reads_it() -> None:
    def expr(key: str, operator: str, *values: str) -> dict[str, Any]:
        return {"key": key, "operator": operator, "values": list(values)}

    gpu = a_node({"pool": "a100", "gen": "5"})
    # Any term; every expression of a term.
    assert template_fits_node(
        required({"matchExpressions": [expr("pool", "In", "h100")]},
                 {"matchExpressions": [expr("pool", "In", "a100"), expr("gen", "Gt", "4")]}),
        gpu,
    )  # fmt: skip
    assert not template_fits_node(
        required({"matchExpressions": [expr("pool", "In", "a100"), expr("gen", "Lt", "5")]}), gpu
    )
    assert template_fits_node(required({"matchExpressions": [expr("spot", "DoesNotExist")]}), gpu)
    assert not template_fits_node(required({"matchExpressions": [expr("spot", "Exists")]}), gpu)
    assert template_fits_node(required({"matchExpressions": [expr("pool", "NotIn", "l4")]}), gpu)
    assert not template_fits_node(required({"matchExpressions": [expr("gen", "Gt", "x")]}), gpu)
    # Fields: the node's name.
    assert template_fits_node(
        required({"matchFields": [expr("metadata.name", "In", "gpu-1")]}), gpu
    )
    assert not template_fits_node(
        required({"matchFields": [expr("metadata.name", "In", "gpu-2")]}), gpu
    )
    assert not template_fits_node(required({}), gpu), "an empty term matches no node"


def test_a_taint_the_template_does_not_tolerate_excludes_the_node() -> None:
    tainted = a_node(
        {}, taints=[{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}]
    )
    assert not template_fits_node({"spec": {}}, tainted)
    for toleration in (
        {"key": "nvidia.com/gpu", "operator": "Exists"},
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
        {"operator": "Exists"},
    ):
        assert template_fits_node({"spec": {"tolerations": [toleration]}}, tainted), toleration
    for toleration in (
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "false"},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"},
    ):
        assert not template_fits_node({"spec": {"tolerations": [toleration]}}, tainted)
    # A preference is not a requirement.
    soft = a_node({}, taints=[{"key": "busy", "effect": "PreferNoSchedule"}])
    assert template_fits_node({"spec": {}}, soft)
    # The startup taint is the agent's to lift once it warmed what the pods need.
    starting = a_node({}, taints=[{"key": STARTUP_TAINT, "value": "true", "effect": "NoSchedule"}])
    assert template_fits_node({"spec": {}}, starting)


# What fits in the budget, and what goes to make room.


def test_a_bento_that_fits_evicts_nothing() -> None:
    records = {ref("a"): record(ref("a"), size=3 * GIB)}
    room = make_room(ref("b"), 4 * GIB, records, {ref("a"), ref("b")}, 10 * GIB)
    assert room.fits
    assert room.evict == ()
    assert room.used == 3 * GIB


def test_room_comes_from_unreferenced_bentos_least_recently_warmed_first() -> None:
    records = {
        ref("old"): record(ref("old"), size=4 * GIB, at="2026-11-29T08:00:00Z"),
        ref("older"): record(ref("older"), size=4 * GIB, at="2026-11-29T07:00:00Z"),
        ref("used"): record(ref("used"), size=4 * GIB, at="2026-11-29T06:00:00Z"),
    }
    room = make_room(ref("new"), 4 * GIB, records, {ref("used"), ref("new")}, 13 * GIB)
    assert room.fits
    assert room.evict == (ref("older"),)
    assert room.used == 8 * GIB


def test_a_bento_a_workload_uses_is_never_evicted_for_another() -> None:
    records = {ref("used"): record(ref("used"), size=8 * GIB)}
    room = make_room(ref("new"), 4 * GIB, records, {ref("used"), ref("new")}, 10 * GIB)
    assert not room.fits
    assert room.evict == ()


def test_evicted_failed_and_its_own_record_take_no_room() -> None:
    records = {
        ref("gone"): record(ref("gone"), state="evicted", size=0),
        ref("bad"): record(ref("bad"), state="failed", size=9 * GIB),
        ref("new"): record(ref("new"), state="warming", size=9 * GIB),  # a resumed warm
    }
    assert make_room(ref("new"), 9 * GIB, records, {ref("new")}, 10 * GIB).fits


@given(
    sizes=st.lists(st.integers(0, 20), min_size=0, max_size=8),
    referenced=st.lists(st.booleans(), min_size=8, max_size=8),
    size=st.integers(0, 20),
    budget=st.integers(0, 40),
)
def test_the_budget_holds_and_only_unreferenced_bentos_go(
    sizes: list[int], referenced: list[bool], size: int, budget: int
) -> None:
    records = {ref(f"m{i}"): record(ref(f"m{i}"), size=s) for i, s in enumerate(sizes)}
    used_by = {ref(f"m{i}") for i in range(len(sizes)) if referenced[i]}
    room = make_room(ref("new"), size, records, used_by, budget)
    assert not set(room.evict) & used_by
    left = sum(sizes) - sum(records[r].bytes for r in room.evict)
    assert room.used == (left if room.fits else sum(sizes))
    if room.fits:
        assert left + size <= budget
    else:
        # Even every unreferenced Bento gone would not make room.
        assert sum(records[r].bytes for r in used_by) + size > budget


def test_unreferenced_bentos_expire_after_the_grace_from_when_they_were_first_seen_unused() -> None:
    records = {ref("a"): record(ref("a")), ref("b"): record(ref("b"))}
    seen = track_unreferenced({}, records, {ref("b")}, NOW)
    assert seen == {ref("a"): NOW}
    later = NOW + dt.timedelta(minutes=30)
    seen = track_unreferenced(seen, records, {ref("b")}, later)
    assert seen == {ref("a"): NOW}, "the first sighting stays"
    assert expired(records, seen, later, 3600) == []
    assert expired(records, seen, NOW + dt.timedelta(hours=1), 3600) == [ref("a")]
    # Used again: forgotten.
    assert track_unreferenced(seen, records, {ref("a"), ref("b")}, later) == {}


def test_the_record_forgets_idle_bentos_after_the_grace_and_past_its_size() -> None:
    """NOW is 2 h after the records' 10:00: an hour's grace has passed for all of them."""
    records = {
        ref("held"): record(ref("held")),
        ref("used"): record(ref("used"), "failed"),
        ref("evicted"): record(ref("evicted"), "evicted"),
        ref("failed"): record(ref("failed"), "failed"),
        ref("over"): record(ref("over"), "over-budget"),
        ref("fresh"): record(ref("fresh"), "evicted", at="2026-11-29T11:30:00Z"),
    }
    gone = forgettable(records, {ref("used")}, NOW, 3600)
    assert gone == sorted([ref("evicted"), ref("failed"), ref("over")])
    # Past the cap the oldest idle go first, the grace notwithstanding; held and used stay.
    many = {
        ref(f"b{n}"): record(ref(f"b{n}"), "evicted", at=f"2026-11-29T11:{n:02d}:00Z")
        for n in range(10)
    }
    many[ref("held")] = record(ref("held"))
    gone = forgettable(many, {ref("b0")}, NOW, 3600 * 24, max_records=5)
    assert gone == [ref(f"b{n}") for n in range(1, 7)]


def test_the_budget_is_held_to_the_disk_with_a_fifth_of_it_free() -> None:
    disk = DiskSpace(total_bytes=100 * GIB, free_bytes=50 * GIB)
    assert disk_budget(20 * GIB, disk, held=0).bytes == 20 * GIB
    assert disk_budget(20 * GIB, None, held=0).bytes == 20 * GIB  # statfs failed
    capped = disk_budget(200 * GIB, disk, held=10 * GIB)
    assert capped.bytes == 40 * GIB  # 50 free + 10 held - 20 kept free
    assert capped.capped is not None
    assert "held to 40960 MiB" in capped.capped
    full = DiskSpace(total_bytes=100 * GIB, free_bytes=5 * GIB)
    assert disk_budget(20 * GIB, full, held=0).bytes == 0
    assert disk_budget(20 * GIB, full, held=0, margin=0).bytes == 5 * GIB


def test_what_needs_warming_and_when_a_failure_is_tried_again() -> None:
    warm = record(ref("a"))
    assert not needs_warming(warm, ())
    assert needs_warming(warm, ("llm:v1",)), "other models"
    assert needs_warming(record(ref("a"), state="warming"), ()), "a restart resumes"
    assert needs_warming(None, ())
    failed = record(ref("a"), state="failed", at="2026-11-29T11:59:30Z")
    assert not retry_due(failed, NOW, 60)
    assert retry_due(failed, NOW + dt.timedelta(seconds=31), 60)
    assert retry_due(None, NOW, 60)


# The record on the Node.


def test_warm_label_keys_are_readable_and_short_enough() -> None:
    assert warm_label_key("llama3-8b-instruct", "4fd7wxrbkcxfylg5") == (
        WARM_LABEL_PREFIX + "llama3-8b-instruct.4fd7wxrbkcxfylg5"
    )
    long_key = warm_label_key("a" * 60, "v" * 100)
    name = long_key.removeprefix(WARM_LABEL_PREFIX)
    assert len(name) <= 63
    assert name[-1].isalnum()
    assert long_key != warm_label_key("a" * 60, "v" * 99 + "w")


def test_the_record_round_trips_and_labels_only_verified_warm_bentos() -> None:
    warmth = NodeWarmth(
        {
            ref("a"): record(ref("a")),
            ref("b"): record(ref("b"), state="warming"),
            ref("c", volume="other"): record(ref("c", volume="other")),
        }
    )
    text = warmth.render()
    assert NodeWarmth.parse(text) == warmth
    entry = json.loads(text)[0]
    assert entry["bento"] == "a:v1"
    assert entry["volume"] == "models"
    assert entry["verified"]
    assert warmth.labels() == {
        WARM_LABEL_PREFIX + "a.v1": "models",
        WARM_LABEL_PREFIX + "c.v1": "other",
    }
    assert NodeWarmth.parse("not json") == NodeWarmth()
    assert NodeWarmth.parse('[{"bento": "x"}]') == NodeWarmth()


def test_the_node_patch_touches_only_our_labels_and_annotation() -> None:
    current = {
        "cloud.google.com/gke-ephemeral-storage-local-ssd": "true",
        WARM_LABEL_PREFIX + "old.v1": "models",
        WARM_LABEL_PREFIX + "kept.v1": "models",
    }
    wanted = {WARM_LABEL_PREFIX + "kept.v1": "models", WARM_LABEL_PREFIX + "new.v1": "models"}
    patch = node_patch(current, wanted, "[]")
    assert patch == {
        "metadata": {
            "labels": {WARM_LABEL_PREFIX + "old.v1": None, WARM_LABEL_PREFIX + "new.v1": "models"},
            "annotations": {WARM_ANNOTATION: "[]"},
        }
    }


# How the agent mounts: as the node's sidecars would.


def test_the_agent_mounts_with_the_sidecars_node_cache_settings(tmp_path: Path) -> None:
    config = InjectorConfig()
    workload = workload_bento(deployment(), "Deployment", config)
    assert not isinstance(workload, str)
    [want] = wanted_bentos([workload])
    spec = mount_spec(
        config, want, Credentials("redis://meta:6379/1", None, None), tmp_path, "juicefs"
    )
    assert spec.cache_mode == "node"
    assert spec.cache_dir == Path(str(config.node_cache_path)) / "models"
    assert spec.cache_size_mib == 184320  # 0.9 x 200Gi, what the injector writes
    assert spec.bento_path == "/bentos/llama/v1"
    assert spec.private_mount.is_relative_to(tmp_path)
    assert spec.warmup_threads == config.warmup.concurrency
    assert spec.free_space_ratio is None  # margin 0: JuiceFS's own 10%
    kept = mount_spec(
        config, want, Credentials("redis://meta:6379/1", None, None), tmp_path, "juicefs", 0.2
    )
    command = JuiceFSMount(kept).command()
    assert command[command.index("--free-space-ratio") + 1] == "0.2"
    # A warm that writes the Bento's local copy keeps no node cache blocks beside it.
    copying = JuiceFSMount(
        mount_spec(
            config, want, Credentials("redis://meta:6379/1", None, None), tmp_path, "juicefs",
            0.2, blocks=False,
        )
    )  # fmt: skip
    command = copying.command()
    assert command[command.index("--cache-size") + 1] == "0"
    assert "--free-space-ratio" not in command
    assert not copying.caches_blocks
    assert JuiceFSMount(kept).caches_blocks


def test_credentials_are_the_mounted_secrets_files(tmp_path: Path) -> None:
    config = InjectorConfig()
    with pytest.raises(CredentialsError, match="metaurl is missing"):
        read_credentials(tmp_path, config)
    (tmp_path / "metaurl").write_text("redis://meta:6379/1\n")
    (tmp_path / "access-key").write_text("reader")
    assert read_credentials(tmp_path, config) == Credentials("redis://meta:6379/1", "reader", None)


def test_the_metrics_follow_the_record() -> None:
    metrics = AgentMetrics()
    metrics.observe(
        NodeWarmth(
            {
                ref("a"): record(ref("a"), size=3 * GIB),
                ref("b"): record(ref("b"), state="warming", size=GIB),
                ref("c"): record(ref("c"), state="over-budget", size=9 * GIB),
            }
        )
    )
    value = metrics.registry.get_sample_value
    assert value("bento_juicefs_node_cache_held_bytes") == 4 * GIB
    assert value("bento_juicefs_node_cache_bentos", {"state": "warm"}) == 1
    assert value("bento_juicefs_node_cache_bentos", {"state": "over-budget"}) == 1
    assert value("bento_juicefs_node_cache_bentos", {"state": "evicted"}) == 0


def test_every_outcome_is_exported_from_the_start() -> None:
    """At 0 before the first warm, so that increase() sees the first failure."""
    metrics = AgentMetrics()
    value = metrics.registry.get_sample_value
    for outcome in ("warm", "WarmFailed", "VerificationFailed", "WarmupTimedOut", "EvictFailed"):
        assert value("bento_juicefs_node_agent_outcomes_total", {"outcome": outcome}) == 0
    assert value("bento_juicefs_node_agent_warm_duration_seconds_count") == 0
    metrics.warm_duration.observe(90)
    assert value("bento_juicefs_node_agent_warm_duration_seconds_bucket", {"le": "60.0"}) == 0
    assert value("bento_juicefs_node_agent_warm_duration_seconds_bucket", {"le": "120.0"}) == 1


def test_only_added_deleted_or_a_new_spec_wakes_the_agent() -> None:
    assert spec_changed("ADDED", None, 1)
    assert spec_changed("DELETED", 3, 3)
    assert spec_changed("MODIFIED", 3, 4)  # a new version, or any template change
    assert not spec_changed("MODIFIED", 4, 4)  # status: a rollout's replica counts
    assert not spec_changed("BOOKMARK", None, None)


class WatchedApi:
    """A NodeApi with no workloads, whose watch reports one change after the first pass."""

    def __init__(self) -> None:
        self.passes = 0
        self.watch_cancelled = False
        self.first_pass = asyncio.Event()
        self.second_pass = asyncio.Event()

    async def node(self) -> dict[str, Any]:
        self.passes += 1
        (self.first_pass if self.passes == 1 else self.second_pass).set()
        return {"metadata": {"name": "n1", "labels": {}, "annotations": {}}}

    async def workloads(self, config: InjectorConfig, node: Any) -> list[Workload]:
        return []

    async def record(self, current_labels: Any, wanted_labels: Any, record: str) -> None:
        raise AssertionError("nothing to record")

    async def event(self, kind: str, reason: str, message: str) -> None:
        raise AssertionError("nothing to say")

    async def remove_taint(self, index: int, key: str) -> None:
        raise AssertionError("no taint to remove")

    async def watch_workloads(self, changed: Callable[[], None]) -> None:
        try:
            await self.first_pass.wait()
            changed()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.watch_cancelled = True
            raise


async def test_a_workload_change_reconciles_at_once_not_at_the_next_resync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_module, "SETTLE_SECONDS", 0.01)
    api = WatchedApi()
    options = AgentOptions(credentials_dir=tmp_path, work_dir=tmp_path, resync_seconds=3600)
    agent = NodeAgent(InjectorConfig(), options, AgentIdentity("n1", "agent-0", "ns"), api)
    running = asyncio.create_task(agent.run_forever())
    try:
        async with asyncio.timeout(5):
            await api.second_pass.wait()
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert api.passes == 2  # the change's, not the hour's resync
    assert api.watch_cancelled  # the watch goes with the loop


class UnlistedApi(WatchedApi):
    """A WatchedApi that fails the test if the agent lists or watches workloads."""

    async def workloads(self, config: InjectorConfig, node: Any) -> list[Workload]:
        raise AssertionError("listed workloads with prewarm off")

    async def watch_workloads(self, changed: Callable[[], None]) -> None:
        raise AssertionError("watched workloads with prewarm off")


async def test_without_prewarm_no_workload_is_listed_or_watched(tmp_path: Path) -> None:
    api = UnlistedApi()
    options = AgentOptions(
        credentials_dir=tmp_path, work_dir=tmp_path, resync_seconds=0.01, prewarm=False
    )
    agent = NodeAgent(InjectorConfig(), options, AgentIdentity("n1", "agent-0", "ns"), api)
    running = asyncio.create_task(agent.run_forever())
    try:
        async with asyncio.timeout(5):
            await api.second_pass.wait()  # the loop still reads the node's record
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert api.passes >= 2


async def test_woken_says_whether_the_event_came_in_time() -> None:
    changed = asyncio.Event()
    assert not await woken(changed, 0.01)
    changed.set()
    assert await woken(changed, 1)


def test_a_seal_covers_a_pod_only_when_verified_and_of_its_models() -> None:
    from common.warm import BentoRef, WarmRecord
    from nodeagent.plan import covers

    ref = BentoRef("models", "llama3", "v1")
    sealed_all = WarmRecord(ref, "warm", verified=True)
    sealed_some = WarmRecord(ref, "warm", verified=True, models=("llama3", "tokenizer"))
    assert covers(sealed_all, ())
    assert covers(sealed_all, ("llama3",))
    assert covers(sealed_some, ("tokenizer",))
    assert not covers(sealed_some, ())  # all models: more than the seal holds
    assert not covers(sealed_some, ("vision",))
    assert not covers(WarmRecord(ref, "warm", verified=False), ())
    assert not covers(WarmRecord(ref, "warming", verified=True), ())
    assert not covers(None, ())


class RecordedApi(WatchedApi):
    """A NodeApi whose Node carries records; what the agent writes back is kept."""

    def __init__(self, records: dict[BentoRef, WarmRecord]) -> None:
        super().__init__()
        self.annotation = NodeWarmth(records).render()
        self.written: list[str] = []

    async def node(self) -> dict[str, Any]:
        return {
            "metadata": {
                "name": "n1",
                "labels": {},
                "annotations": {WARM_ANNOTATION: self.annotation},
            }
        }

    async def record(self, current_labels: Any, wanted_labels: Any, record: str) -> None:
        self.written.append(record)
        self.annotation = record


async def test_a_pass_forgets_the_records_of_idle_bentos(tmp_path: Path) -> None:
    api = RecordedApi(
        {ref("held"): record(ref("held")), ref("evicted"): record(ref("evicted"), "evicted")}
    )
    options = AgentOptions(credentials_dir=tmp_path, work_dir=tmp_path, prewarm=False)
    agent = NodeAgent(
        InjectorConfig(), options, AgentIdentity("n1", "agent-0", "ns"), api, clock=lambda: NOW
    )
    agent.unreferenced_since = {ref("held"): NOW}  # just seen unused: not evicted yet
    await agent.reconcile()
    [written] = api.written
    assert set(NodeWarmth.parse(written).records) == {ref("held")}
    await agent.reconcile()
    assert len(api.written) == 1, "nothing more to forget"


# -- a node's start: Ready to warm, and the startup taint ------------------------------


def ready_node(at: str = "2026-11-29T11:59:00Z", taints: list[Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "n1", "labels": {}, "annotations": {}},
        "spec": {"taints": taints} if taints is not None else {},
        "status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": at}]},
    }


STARTUP = {"key": STARTUP_TAINT, "value": "true", "effect": "NoSchedule"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def test_a_node_is_ready_since_its_ready_condition_turned_true() -> None:
    assert ready_since(ready_node()) == dt.datetime(2026, 11, 29, 11, 59, tzinfo=dt.UTC)
    not_ready = ready_node()
    not_ready["status"]["conditions"][0]["status"] = "False"
    assert ready_since(not_ready) is None
    assert ready_since({"metadata": {}}) is None


def test_the_startup_taint_is_found_where_it_is_in_the_taints() -> None:
    assert taint_index(ready_node(taints=[GPU_TAINT, STARTUP]), STARTUP_TAINT) == 1
    assert taint_index(ready_node(taints=[STARTUP]), STARTUP_TAINT) == 0
    assert taint_index(ready_node(taints=[GPU_TAINT]), STARTUP_TAINT) is None
    assert taint_index(ready_node(), STARTUP_TAINT) is None


def test_timestamps_are_read_as_the_api_and_as_the_client_write_them() -> None:
    moment = dt.datetime(2026, 11, 29, 11, 59, tzinfo=dt.UTC)
    assert parse_timestamp("2026-11-29T11:59:00Z") == moment
    assert parse_timestamp("2026-11-29T11:59:00+00:00") == moment
    assert parse_timestamp(moment) == moment
    assert parse_timestamp("yesterday") is None
    assert parse_timestamp("2026-11-29T11:59:00") is None  # no zone: not the API's


def test_a_node_is_settled_once_every_wanted_bento_is_warm_or_has_no_room() -> None:
    a, b = ref("a"), ref("b")
    settle = functools.partial(startup_settled, prewarm=True, timeout_seconds=600)
    assert settle([a, b], {a: record(a)}, waited_seconds=5) is None
    assert settle([a, b], {a: record(a), b: record(b, "warming")}, waited_seconds=5) is None
    warm = settle([a, b], {a: record(a), b: record(b)}, waited_seconds=5)
    assert warm == Settled("2 Bentos warm", warm=True)
    no_room = settle([a, b], {a: record(a), b: record(b, "over-budget")}, waited_seconds=5)
    assert no_room is not None
    assert no_room.warm
    assert no_room.message == "1 Bento warm, 1 without room in the node budget (b:v1 (models))"
    assert settle([], {}, waited_seconds=0) == Settled("no Bento is deployed for this node", True)


def test_a_node_whose_bentos_do_not_warm_is_given_up_on_after_the_timeout() -> None:
    a, b = ref("a"), ref("b")
    failed = {a: record(a), b: record(b, "failed")}
    assert (
        startup_settled([a, b], failed, prewarm=True, waited_seconds=599, timeout_seconds=600)
        is None
    )
    late = startup_settled([a, b], failed, prewarm=True, waited_seconds=600, timeout_seconds=600)
    assert late == Settled("1 of 2 Bentos not warm after 600s: b:v1 (models)", warm=False)
    off = startup_settled([a], {}, prewarm=False, waited_seconds=0, timeout_seconds=600)
    assert off is not None
    assert off.warm


class StartingNodeApi:
    """A NodeApi of a node with the startup taint and one Bento deployed for it."""

    def __init__(self, workloads: list[Workload], taints: list[Any]) -> None:
        self.listed = workloads
        self.node_json = ready_node(taints=taints)
        self.events: list[tuple[str, str, str]] = []
        self.removed: list[tuple[int, str]] = []

    async def node(self) -> dict[str, Any]:
        return self.node_json

    async def workloads(self, config: InjectorConfig, node: Any) -> list[Workload]:
        return self.listed

    async def record(self, current_labels: Any, wanted_labels: Any, record: str) -> None:
        self.node_json["metadata"]["annotations"][WARM_ANNOTATION] = record

    async def event(self, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))

    async def remove_taint(self, index: int, key: str) -> None:
        self.removed.append((index, key))
        del self.node_json["spec"]["taints"][index]

    async def watch_workloads(self, changed: Callable[[], None]) -> None:
        await asyncio.Event().wait()


async def test_the_agent_removes_the_startup_taint_and_says_when_once_the_node_is_warm(
    tmp_path: Path,
) -> None:
    bento = ref("llama")
    api = StartingNodeApi([], [GPU_TAINT, STARTUP])
    options = AgentOptions(credentials_dir=tmp_path, work_dir=tmp_path)
    agent = NodeAgent(
        InjectorConfig(), options, AgentIdentity("n1", "agent-0", "ns"), api, clock=lambda: NOW
    )
    warm = NodeWarmth({bento: record(bento, "warming")})
    agent.warmth = warm
    await agent._settle(api.node_json, [bento])
    assert api.removed == []  # still warming
    agent.warmth = NodeWarmth({bento: record(bento)})
    await agent._settle(api.node_json, [bento])
    assert api.removed == [(1, STARTUP_TAINT)]
    assert api.node_json["spec"]["taints"] == [GPU_TAINT]
    ((kind, reason, message),) = api.events
    assert (kind, reason) == ("Normal", "NodeWarm")
    said = "1 Bento warm, 60.0s after the node turned Ready; removed the startup taint"
    assert message == f"{said} {STARTUP_TAINT}"
    assert agent.metrics.ready_to_warm._value.get() == 60.0
    await agent._settle(api.node_json, [bento])
    assert len(api.events) == 1  # said once per agent start


async def test_an_agent_started_long_after_the_node_gives_up_silently_without_a_taint(
    tmp_path: Path,
) -> None:
    api = StartingNodeApi([], [GPU_TAINT])
    options = AgentOptions(credentials_dir=tmp_path, work_dir=tmp_path)
    agent = NodeAgent(
        InjectorConfig(),
        options,
        AgentIdentity("n1", "agent-0", "ns"),
        api,
        clock=lambda: NOW + dt.timedelta(days=3),
    )
    await agent._settle(api.node_json, [ref("a")])
    assert api.events == []
    assert api.removed == []
