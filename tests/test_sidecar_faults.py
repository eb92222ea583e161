"""The sidecar's answers to faults, without a cluster: a full cache disk, an apiserver away.

The decisions are pure functions (sidecar.decisions); the ordered reporter
keeps the apiserver off the mount's and the stream's path; the condition
and the seal are asked again of a node agent (a real unix socket) that
restarts mid-request.
The same faults on the real node: tests/e2e/test_sidecar_faults.py.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.agentsocket import LineBuffer, Request, parse_request, render_reply
from common.diskspace import DiskSpace, disk_space
from common.env import SSD_POLICIES, SsdPolicy
from modelstore.juicefs_output import juicefs_says_cache_full
from modelstore.manifest import read_manifest
from sidecar.agent import AgentChannel, AgentReporter, AgentUnreachable
from sidecar.cachedisk import CacheSpeed
from sidecar.cachewatch import CacheSpaceWatch
from sidecar.decisions import (
    CachePlan,
    cache_full,
    cache_full_message,
    cache_keeps,
    cache_plan,
    gate_after_warmup,
    gate_plan,
    should_fill_cache,
    should_measure_cache,
)
from sidecar.gate import open_gate
from sidecar.reporter import OrderedReporter
from tests.kit.sidecar import FakeReporter, RecordingFiller, published_bento, settings_for

MIB = 1 << 20
GIB = 1 << 30

# -- a full cache disk: the decisions ---------------------------------------------------


@pytest.mark.parametrize(
    ("space", "full"),
    [
        (DiskSpace(10 * GIB, 5 * GIB, 1000, 900), False),
        # Under JuiceFS's 10% it evicts its own blocks to make room: a cache at its limit.
        (DiskSpace(10 * GIB, GIB - 1, 1000, 900), False),
        (DiskSpace(10 * GIB, GIB // 2, 1000, 900), False),
        (DiskSpace(10 * GIB, GIB // 2 - 1, 1000, 900), True),  # under half: it writes nothing
        (DiskSpace(48 * MIB, 2 * MIB), True),  # inodes unknown (0): space alone decides
        (DiskSpace(10 * GIB, 5 * GIB, 1000, 49), True),  # out of inodes
        (DiskSpace(0, 0), False),  # statfs said nothing useful
        (None, False),  # statfs failed: JuiceFS itself will say so if it is full
    ],
)
def test_a_disk_is_full_for_juicefs_below_its_free_ratio(
    space: DiskSpace | None, full: bool
) -> None:
    assert cache_full(space) is full


def test_the_free_space_of_a_real_directory(tmp_path: Path) -> None:
    space = disk_space(tmp_path / "made")
    assert space is not None
    assert (tmp_path / "made").is_dir()
    assert 0 < space.free_bytes <= space.total_bytes
    assert disk_space(Path("/proc/self/nothing/here")) is None


# What juicefs 1.4.2 logs (its format strings, filled in as it fills them).
JUICEFS_FULL_LINES = [
    "<WARNING>: Write to cache file /c/raw/chunks/0/0/5_0_4194304.tmp failed: write "
    "/c/raw/chunks/0/0/5_0_4194304.tmp: no space left on device [disk_cache.go:421]",
    "<WARNING>: Can't create cache file /c/raw/chunks/0/0/5_1_4194304.tmp: open "
    "/c/raw/chunks/0/0/5_1_4194304.tmp: no space left on device",
    "<DEBUG>: Caching directory is full (/c/raw), drop chunks/0/0/5_2_4194304 (4194304 bytes)",
]
JUICEFS_OTHER_LINES = [
    # At mount, under its ratio: it evicts its own blocks to make room (a cache at its limit).
    "2026/11/29 08:00:00.000000 juicefs[7] <WARNING>: not enough space (8%) or inodes (99%) for "
    "caching in /var/lib/juicefs/cache/2f1c/raw: free ratio should be >= 10% [disk_cache.go:115]",
    "<INFO>: Disk cache (/c/raw): used ratio - [space 3.1%, inode 0.1%] [disk_cache.go:118]",
    "<INFO>: Adjusted cache capacity based on freeratio: from 1073741824 to 45298483 bytes",
    "<DEBUG>: Caching queue is full (/c/raw), drop chunks/0/0/5_2_4194304 (4194304 bytes)",
    "<WARNING>: read file 5: input/output error",
]


@pytest.mark.parametrize("line", JUICEFS_FULL_LINES)
def test_juicefs_lines_that_say_the_cache_disk_is_full(line: str) -> None:
    assert juicefs_says_cache_full(line)


@pytest.mark.parametrize("line", JUICEFS_OTHER_LINES)
def test_juicefs_lines_that_do_not(line: str) -> None:
    # A full queue is a slow disk, not a full one: the cache fill adds those blocks.
    assert not juicefs_says_cache_full(line)


def test_the_cache_disk_full_event_says_what_happens() -> None:
    message = cache_full_message(
        "/var/lib/juicefs/cache", DiskSpace(48 * MIB, 2 * MIB), JUICEFS_FULL_LINES[0]
    )
    assert "2 MiB free of 48 MiB (4% free" in message
    assert "JuiceFS keeps 10% (5 MiB) free and writes no block below 5%" in message
    assert "no space left on device" in message
    assert "read from the object store" in message
    assert "verified against the manifest before the gate opens" in message
    assert "free space unknown" in cache_full_message("/c", None, None)


def test_a_full_disk_is_not_probed_keeps_its_cache_and_is_not_filled() -> None:
    assert should_measure_cache("required", full=True) is False
    assert should_measure_cache("required", full=False) is True
    # What is cached there (a warm node) still serves; JuiceFS reads the rest from the store.
    assert cache_plan("required", None, 200, 18432, full=True) == CachePlan(18432, full=True)
    assert cache_plan("required", None, 200, 0, full=True) == CachePlan(0)
    assert should_fill_cache(True, full=True) is False
    assert should_fill_cache(True, full=False) is True
    assert should_fill_cache(False, full=False) is False


def test_the_gate_on_a_full_disk_opens_on_verified_bytes_and_says_why() -> None:
    gate = gate_plan(True, CachePlan(18432, full=True))
    assert (gate.verify, gate.reason) == (True, "ModelsVerified")
    assert "cache disk is full" in gate.message
    # Found full only after the stream: the same, never less verified.
    cached = gate_plan(True, CachePlan(18432))
    assert gate_after_warmup(cached, False) == cached
    assert gate_after_warmup(cached, True) == gate
    off = gate_plan(False, CachePlan(18432))
    assert gate_after_warmup(off, True) == off


@given(
    policy=st.sampled_from(SSD_POLICIES),
    write=st.floats(min_value=0, max_value=10_000),
    read=st.floats(min_value=0, max_value=10_000),
    minimum=st.floats(min_value=0, max_value=10_000),
    measured=st.booleans(),
    full=st.booleans(),
    full_later=st.booleans(),
    size=st.sampled_from([0, 1024, 18432]),
)
def test_no_disk_decision_opens_the_gate_unverified(
    policy: SsdPolicy,
    write: float,
    read: float,
    minimum: float,
    measured: bool,
    full: bool,
    full_later: bool,
    size: int,
) -> None:
    speed = CacheSpeed(write, read, direct_io=True) if measured and not full else None
    gate = gate_plan(True, cache_plan(policy, speed, minimum, size, full))
    assert gate.verify
    assert gate_after_warmup(gate, full_later).verify


# -- a full cache disk: the sidecar's gate ------------------------------------------------


@dataclass
class MessageReporter(FakeReporter):
    messages: dict[str, str] = field(default_factory=dict)

    async def event(self, kind: str, reason: str, message: str) -> None:
        await super().event(kind, reason, message)
        self.messages[reason] = message


def test_a_disk_found_full_after_the_stream_is_reported_not_filled_and_still_verified(
    tmp_path: Path,
) -> None:
    bento = published_bento(tmp_path)
    settings = settings_for(bento)
    reporter = MessageReporter()
    filler = RecordingFiller()
    juicefs_said = [JUICEFS_FULL_LINES[0]]
    watch = CacheSpaceWatch(tmp_path / "cache", reporter, lambda: juicefs_said)
    gate = gate_plan(True, CachePlan(18432))
    asyncio.run(open_gate(settings, bento, reporter, gate, filler=filler, cache_watch=watch))
    assert reporter.said == [
        ("event", "WarmupStarted"),
        ("event", "CacheDiskFull"),
        ("event", "ModelsReady"),
        ("condition", "True", "ModelsVerified"),
        ("event", "Ready"),
    ]
    assert "no space left on device" in reporter.messages["CacheDiskFull"]
    assert reporter.messages["CacheDiskFull"].startswith("after streaming the model: cache dir")
    assert filler.asked == []  # the fill would fetch the model again for nothing


def test_a_disk_with_room_is_filled_and_says_nothing(tmp_path: Path) -> None:
    bento = published_bento(tmp_path)
    reporter = MessageReporter()
    filler = RecordingFiller()
    watch = CacheSpaceWatch(tmp_path / "cache", reporter)
    gate = gate_plan(True, CachePlan(18432))
    asyncio.run(
        open_gate(settings_for(bento), bento, reporter, gate, filler=filler, cache_watch=watch)
    )
    assert "CacheDiskFull" not in reporter.messages
    assert ("condition", "True", "ModelsCached") in reporter.said
    assert len(filler.asked) == 1


def test_a_model_larger_than_the_cache_is_verified_never_filled_and_said_once(
    tmp_path: Path,
) -> None:
    """The fill would fetch what the reads evicted, evict more, and end short: ~6x the model."""
    bento = published_bento(tmp_path)
    model = sum(f.size for f in read_manifest(bento.bento_dir).files)
    settings = replace(settings_for(bento), cache_size_mib=model // (2 * MIB))
    assert settings.cache_size_mib > 0
    reporter = MessageReporter()
    filler = RecordingFiller()
    watch = CacheSpaceWatch(tmp_path / "cache", reporter)
    gate = gate_plan(True, CachePlan(settings.cache_size_mib))
    asyncio.run(open_gate(settings, bento, reporter, gate, filler=filler, cache_watch=watch))
    assert reporter.said == [
        ("event", "WarmupStarted"),
        ("event", "CacheTooSmall"),
        ("event", "ModelsReady"),
        ("condition", "True", "ModelsVerified"),
        ("event", "Ready"),
    ]
    said = reporter.messages["CacheTooSmall"]
    assert f"larger than this pod's cache ({settings.cache_size_mib} MiB)" in said
    assert "juicefs.bentoml.com/cache-size" in said
    assert filler.asked == []


def test_a_model_the_cache_holds_exactly_is_kept() -> None:
    assert cache_keeps(64 * MIB, 64)
    assert not cache_keeps(64 * MIB + 1, 64)
    assert not cache_keeps(1, 0)


# -- the apiserver away: Events off the path, conditions in order ----------------------------


@dataclass
class SlowApiserver:
    """A Reporter whose calls take `delay` seconds each (an apiserver behind a DROP rule)."""

    delay: float = 0.3
    fail_conditions: int = 0
    calls: list[tuple[str, ...]] = field(default_factory=list)

    async def event(self, kind: str, reason: str, message: str) -> None:
        await asyncio.sleep(self.delay)
        self.calls.append(("event", reason))

    async def set_condition(
        self, status: str, reason: str, message: str, attempts: int | None = 8
    ) -> None:
        await asyncio.sleep(self.delay)
        if self.fail_conditions:
            self.fail_conditions -= 1
            raise OSError("connection timed out")
        self.calls.append(("condition", status, reason))


def test_events_return_at_once_and_go_out_in_order_conditions_too() -> None:
    inner = SlowApiserver()

    async def scenario() -> tuple[float, float]:
        ordered = OrderedReporter(inner)
        started = time.monotonic()
        ordered.post_condition("False", "Mounting", "mounting JuiceFS")
        for reason in ("MountReady", "WarmupStarted", "ModelsReady"):
            await ordered.event("Normal", reason, "")
        queued = time.monotonic() - started
        await ordered.set_condition("True", "ModelsCached", "", attempts=None)
        await ordered.event("Normal", "Ready", "")
        assert await ordered.close(within=5)
        return queued, time.monotonic() - started

    queued, total = asyncio.run(scenario())
    assert queued < 0.1  # nothing waited for the slow apiserver
    assert total >= 5 * inner.delay
    assert inner.calls == [
        ("condition", "False", "Mounting"),  # never after True: it would shut the gate
        ("event", "MountReady"),
        ("event", "WarmupStarted"),
        ("event", "ModelsReady"),
        ("condition", "True", "ModelsCached"),
        ("event", "Ready"),
    ]


def test_a_condition_that_fails_raises_to_its_caller_and_the_queue_goes_on() -> None:
    inner = SlowApiserver(delay=0.01, fail_conditions=2)

    async def scenario() -> None:
        ordered = OrderedReporter(inner)
        ordered.post_condition("False", "Mounting", "")  # fails: nobody waits, nothing raised
        with pytest.raises(OSError, match="timed out"):
            await ordered.set_condition("False", "VerificationFailed", "", attempts=8)
        await ordered.event("Warning", "VerificationFailed", "")
        assert await ordered.close(within=5)

    asyncio.run(scenario())
    assert inner.calls == [("event", "VerificationFailed")]


def test_a_condition_given_up_by_its_caller_does_not_hold_back_what_follows() -> None:
    inner = SlowApiserver(delay=3600)  # an apiserver that never answers

    async def scenario() -> bool:
        ordered = OrderedReporter(inner)
        setting = asyncio.ensure_future(ordered.set_condition("True", "ModelsCached", ""))
        await asyncio.sleep(0.05)
        setting.cancel()  # SIGTERM: the warmup task is cancelled
        with pytest.raises(asyncio.CancelledError):
            await setting
        inner.delay = 0.01
        await ordered.event("Normal", "Unmounted", "")
        return await ordered.close(within=2)

    assert asyncio.run(scenario()) is True
    assert inner.calls == [("event", "Unmounted")]


def test_close_gives_up_after_its_time_and_counts_overflow() -> None:
    inner = SlowApiserver(delay=3600)

    async def scenario() -> tuple[bool, float, int]:
        ordered = OrderedReporter(inner, limit=3)
        for i in range(5):
            await ordered.event("Normal", f"E{i}", "")
        started = time.monotonic()
        flushed = await ordered.close(within=0.2)
        return flushed, time.monotonic() - started, ordered.dropped

    flushed, seconds, dropped = asyncio.run(scenario())
    assert flushed is False
    assert seconds < 2
    assert dropped == 2


# -- the node agent away, then back: the condition and the seal are asked again --------------


class RestartingAgent:
    """A node agent on a real unix socket that drops its first `drops` requests.

    Each drop closes the connection without a reply and the listening socket
    with it, as a deleted agent pod does; the next listener (its successor)
    binds the same path a moment later and answers.
    """

    def __init__(self, path: Path, drops: int) -> None:
        self.path = path
        self.drops = drops
        self.answered: list[Request] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> RestartingAgent:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=10)

    def _listen(self) -> socket.socket:
        self.path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.path))
        server.listen()
        return server

    def _serve(self) -> None:
        while True:
            with self._listen() as server:
                conn, _ = server.accept()
            # The listener is gone before the connection drops: a client
            # that reconnects at once finds no agent, as after a pod delete.
            with conn:
                buffer = LineBuffer()
                lines: list[bytes] = []
                while not lines:
                    lines = buffer.feed(conn.recv(4096))
                request = parse_request(lines[0])
                if self.drops == 0:
                    self.answered.append(request)
                    conn.sendall(render_reply())
                    return
                self.drops -= 1  # gone mid-request, socket and all
            time.sleep(0.3)  # the successor pod takes a moment to bind


def test_the_condition_is_asked_again_of_a_restarted_agent_until_it_lands(
    tmp_path: Path,
) -> None:
    with RestartingAgent(tmp_path / "agent.sock", drops=3) as agent:
        channel = AgentChannel(agent.path, connect_timeout=10)
        reporter = AgentReporter(channel)
        asyncio.run(reporter.set_condition("True", "ModelsCached", "verified", attempts=None))
        channel.close()
    assert [(r.op, r.kind, r.reason) for r in agent.answered] == [
        ("condition", "True", "ModelsCached")
    ]


def test_a_seal_interrupted_by_an_agent_restart_is_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidecar import gate

    monkeypatch.setattr(gate, "SEAL_RETRY_SECONDS", 0.1)
    reporter = FakeReporter()
    with RestartingAgent(tmp_path / "agent.sock", drops=3) as agent:
        channel = AgentChannel(agent.path, connect_timeout=10, reply_timeout=None)
        asyncio.run(gate._seal_until_answered(channel, reporter))
        channel.close()
    assert [r.op for r in agent.answered] == ["seal"]
    # The channel retries once by itself; each loss it gives up on is an Event.
    assert reporter.said == [("event", "SealInterrupted")]


def test_a_probe_with_no_room_for_its_file_counts_as_full_and_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from sidecar import run as sidecar_run

    def no_room(directory: Path) -> CacheSpeed:
        raise OSError(errno.ENOSPC, "No space left on device")

    def unwritable(directory: Path) -> CacheSpeed:
        raise OSError(errno.EROFS, "Read-only file system")

    settings = replace(settings_for(published_bento(tmp_path)), ssd_policy="required")
    monkeypatch.setattr(sidecar_run, "measure", no_room)
    assert asyncio.run(sidecar_run._measure_cache(settings, full=False)) == (None, True)
    monkeypatch.setattr(sidecar_run, "measure", unwritable)
    assert asyncio.run(sidecar_run._measure_cache(settings, full=False)) == (None, False)

    # statfs says there is room again (the probe's file is gone): the Event still goes out.
    reporter = MessageReporter()
    watch = CacheSpaceWatch(tmp_path, reporter)

    async def checks() -> tuple[bool, bool]:
        return await watch.check("before mounting"), await watch.check("probe", full=True)

    assert asyncio.run(checks()) == (False, True)
    assert reporter.messages["CacheDiskFull"].startswith("probe: cache dir")


# -- the cache fill: juicefs warmup exits 0 with the store down, --check says so ---------------


def test_what_juicefs_warmup_check_says_is_parsed() -> None:
    from modelstore.juicefs_output import parse_cache_check

    # Real juicefs 1.4.2 output: after a warmup with MinIO down, then after one that worked.
    down = (
        "2026/11/29 08:00:37.537746 juicefs[22876] <INFO>: check cache: 6 files checked, "
        "0 B of 16 MiB (0.0%) cached [warmup@warmup.go:332]\n"
    )
    done = (
        "+----------+--------+------------+\n"
        "2026/11/29 08:00:37.259016 juicefs[22847] <INFO>: check cache: 6 files checked, "
        "16 MiB of 16 MiB (100.0%) cached [warmup@warmup.go:332]\n"
    )
    missing = parse_cache_check(down)
    assert missing is not None
    assert (missing.files, missing.complete, missing.describe()) == (
        6,
        False,
        "0 B of 16 MiB (0.0%)",
    )
    complete = parse_cache_check(done)
    assert complete is not None
    assert complete.complete
    partly = parse_cache_check("check cache: 9 files checked, 1020 MiB of 1.0 GiB (99.6%) cached")
    assert partly is not None
    assert not partly.complete
    assert parse_cache_check("warmup cache: 6 files (16 MiB bytes)") is None


def test_closing_the_channel_ends_a_wait_for_an_agent_that_is_not_there(tmp_path: Path) -> None:
    """A sidecar stopping on a node without the agent exits at once (asyncio.run waits
    for its threads, and a pod's deletion waits for the sidecar)."""
    channel = AgentChannel(tmp_path / "agent.sock", connect_timeout=60)

    async def scenario() -> float:
        started = time.monotonic()
        asking = asyncio.create_task(channel.unmount())
        await asyncio.sleep(0.3)
        channel.close()
        with pytest.raises(AgentUnreachable, match="the sidecar is stopping"):
            await asking
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 5
