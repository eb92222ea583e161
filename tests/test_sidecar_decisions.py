"""The sidecar's decisions (sidecar.decisions) and the gate they drive (sidecar.run.open_gate).

The gate must never open on bytes that were not verified against the
manifest, whatever the cache policy decided about a slow disk; only the pod
owner's warmup=false opens it on the mount alone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.env import SSD_POLICIES, SsdPolicy
from sidecar.cachedisk import CacheSpeed
from sidecar.decisions import (
    CachePlan,
    GatePlan,
    cache_plan,
    gate_plan,
    gate_unsealed,
    should_measure_cache,
    slow_disk_action,
)
from sidecar.gate import open_gate
from tests.helpers import flip_middle_byte
from tests.kit.sidecar import FakeReporter, PublishedBento, published_bento, settings_for

SLOW = CacheSpeed(write_mbps=80, read_mbps=500, direct_io=True)
FAST = CacheSpeed(write_mbps=900, read_mbps=2500, direct_io=True)
MINIMUM = 200.0


@pytest.mark.parametrize(
    ("policy", "expected"), [("required", True), ("preferred", True), ("off", False)]
)
def test_the_cache_disk_is_probed_unless_the_pod_said_off(
    policy: SsdPolicy, expected: bool
) -> None:
    assert should_measure_cache(policy) is expected


@pytest.mark.parametrize(
    ("policy", "speed", "expected"),
    [
        ("required", FAST, CachePlan(18432)),
        ("preferred", FAST, CachePlan(18432)),
        ("off", None, CachePlan(18432)),
        # A slow disk makes hits slower than misses.
        ("required", SLOW, CachePlan(0, slow=True)),
        ("preferred", SLOW, CachePlan(18432, slow=True)),
    ],
)
def test_cache_plan(policy: SsdPolicy, speed: CacheSpeed | None, expected: CachePlan) -> None:
    assert cache_plan(policy, speed, MINIMUM, 18432) == expected


def test_the_slow_disk_event_says_what_happens_next() -> None:
    assert slow_disk_action(CachePlan(18432, slow=True)) == "continuing with it"
    without = slow_disk_action(CachePlan(0, slow=True))
    assert without.startswith("mounting without a disk cache")
    assert "verified before the gate opens" in without


@pytest.mark.parametrize(
    ("warmup", "cache", "expected"),
    [
        (True, CachePlan(18432), ("ModelsCached", True)),
        (True, CachePlan(18432, slow=True), ("ModelsCached", True)),
        # Issue 12: required + slow disk mounts without a cache, and still verifies.
        (True, CachePlan(0, slow=True), ("ModelsVerified", True)),
        # The pod owner turned warmup off: the gate opens once mounted, and says so.
        (False, CachePlan(18432), ("Mounted", False)),
        (False, CachePlan(0, slow=True), ("Mounted", False)),
    ],
)
def test_gate_plan(warmup: bool, cache: CachePlan, expected: tuple[str, bool]) -> None:
    gate = gate_plan(warmup, cache)
    assert (gate.reason, gate.verify) == expected


@pytest.mark.parametrize("full", [False, True])
def test_an_unsealed_node_cache_pod_still_verifies_and_never_claims_a_cached_copy(
    full: bool,
) -> None:
    node_gate = gate_plan(True, cache_plan("required", FAST, MINIMUM, 18432))
    unsealed = gate_unsealed(node_gate, full)
    assert unsealed.verify
    assert unsealed.reason == "ModelsVerified"
    assert ("cache disk is full" in unsealed.message) is full
    # warmup=false stays what its owner chose: the mount alone.
    mounted = gate_plan(False, cache_plan("required", FAST, MINIMUM, 18432))
    assert gate_unsealed(mounted, full) == mounted


@given(
    policy=st.sampled_from(SSD_POLICIES),
    write=st.floats(min_value=0, max_value=10_000),
    read=st.floats(min_value=0, max_value=10_000),
    minimum=st.floats(min_value=0, max_value=10_000),
    measured=st.booleans(),
)
def test_no_cache_decision_opens_the_gate_unverified(
    policy: SsdPolicy, write: float, read: float, minimum: float, measured: bool
) -> None:
    speed = CacheSpeed(write, read, direct_io=True) if measured else None
    assert gate_plan(True, cache_plan(policy, speed, minimum, 1024)).verify


def open_with(bento: PublishedBento, gate: GatePlan) -> FakeReporter:
    reporter = FakeReporter()
    asyncio.run(open_gate(settings_for(bento), bento, reporter, gate))
    return reporter


SLOW_DISK_REQUIRED = gate_plan(True, cache_plan("required", SLOW, MINIMUM, 18432))


def test_required_policy_on_a_slow_disk_verifies_before_the_gate_opens(tmp_path: Path) -> None:
    reporter = open_with(published_bento(tmp_path), SLOW_DISK_REQUIRED)
    assert reporter.said == [
        ("event", "WarmupStarted"),
        ("event", "ModelsReady"),
        ("condition", "True", "ModelsVerified"),
        ("event", "Ready"),
    ]


def test_required_policy_on_a_slow_disk_keeps_the_gate_shut_on_bad_bytes(
    tmp_path: Path,
) -> None:
    bento = published_bento(tmp_path)
    shard = bento.models_dir / "llama3" / "v1" / "model.safetensors"
    flip_middle_byte(shard)
    reporter = open_with(bento, SLOW_DISK_REQUIRED)
    assert ("condition", "False", "VerificationFailed") in reporter.said
    assert not any(said[:2] == ("condition", "True") for said in reporter.said)


def test_warmup_disabled_opens_the_gate_once_mounted(tmp_path: Path) -> None:
    bento = PublishedBento(tmp_path / "nothing-published-yet")
    reporter = open_with(bento, gate_plan(False, CachePlan(18432)))
    assert reporter.said == [("condition", "True", "Mounted"), ("event", "Ready")]
