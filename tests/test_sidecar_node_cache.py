"""The sidecar's side of the node cache, without a mount: its juicefs options, byte sources.

The real thing (two pods sharing one node cache, the budget with three
models) is in tests/storage/test_node_cache.py.
"""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from modelstore.mount import JuiceFSMount, MountError
from modelstore.sources import (
    JuiceFSCounters,
    MountCounters,
    Snapshot,
    byte_sources,
    cache_writes_settled,
    parse_counters,
)
from sidecar import run as sidecar_run
from sidecar.agent import AgentError
from sidecar.cachedisk import measure
from sidecar.decisions import GatePlan, seal_before_mount
from sidecar.env import Settings
from sidecar.gate import SealOutcome, open_gate_sealed
from sidecar.metrics import SidecarMetrics
from sidecar.startup import ModelsShown
from sidecar.verify import verify_model
from tests.helpers import minimal_env
from tests.kit.sidecar import (
    FakeReporter,
    Recorder,
    RecordingFiller,
    published_bento,
    settings_for,
)

MIB = 1 << 20

# Lines as juicefs 1.4.2 serves them on --metrics (labels shortened).
METRICS = """\
# HELP juicefs_object_request_data_bytes Object requests size in bytes.
# TYPE juicefs_object_request_data_bytes counter
juicefs_object_request_data_bytes{method="GET",mp="/v",vol_name="models"} 6.7310406e+07
juicefs_object_request_data_bytes{method="PUT",mp="/v",vol_name="models"} 1024
juicefs_object_request_durations_histogram_seconds_bucket{method="GET",le="+Inf"} 21
juicefs_object_request_durations_histogram_seconds_count{method="GET",mp="/v"} 21
juicefs_object_request_durations_histogram_seconds_count{method="HEAD",mp="/v"} 3
juicefs_blockcache_hit_bytes{mp="/v",vol_name="models"} 3.00618566e+08
juicefs_blockcache_miss_bytes{mp="/v",vol_name="models"} 0
juicefs_blockcache_writes{mp="/v",vol_name="models"} 4
juicefs_blockcache_write_hist_seconds_sum{mp="/v",vol_name="models"} 0.018440534
juicefs_blockcache_write_hist_seconds_count{mp="/v",vol_name="models"} 3
"""


def test_counters_are_parsed_from_juicefs_prometheus_text() -> None:
    assert parse_counters(METRICS) == JuiceFSCounters(
        get_bytes=67310406,
        gets=21,
        hit_bytes=300618566,
        miss_bytes=0,
        cache_writes=4,
        cache_writes_done=3,
    )
    assert parse_counters("") == JuiceFSCounters()


def writes(begun: int, done: int) -> JuiceFSCounters:
    return JuiceFSCounters(cache_writes=begun, cache_writes_done=done)


@pytest.mark.parametrize(
    ("samples", "settled"),
    [
        ([writes(4, 4), writes(4, 4)], True),
        ([writes(2, 1), writes(4, 4), writes(4, 4)], True),
        ([writes(4, 4)], False),  # one look proves nothing
        ([writes(4, 3), writes(4, 3)], False),  # a write in progress
        ([writes(3, 3), writes(4, 4)], False),  # a queued block started meanwhile
        ([], False),
    ],
)
def test_the_cache_is_written_once_every_begun_write_is_done_and_none_starts(
    samples: list[JuiceFSCounters], settled: bool
) -> None:
    assert cache_writes_settled(samples, quiet=2) is settled


def snap(generation: int, get_bytes: int, gets: int = 0) -> Snapshot:
    return Snapshot(generation, JuiceFSCounters(get_bytes=get_bytes, gets=gets))


def test_the_store_sent_what_the_get_counter_grew_by_and_the_cache_the_rest() -> None:
    sources = byte_sources(100 * MIB, snap(1, 5 * MIB, 2), snap(1, 8 * MIB, 3))
    assert sources is not None
    assert sources.from_store == 3 * MIB
    assert sources.from_cache == 97 * MIB
    assert sources.store_gets == 1
    assert sources.cache_fraction == pytest.approx(0.97)
    assert sources.describe("node") == (
        "97 MiB (97.0%) from the node cache, 3 MiB from the object store (1 GETs)"
    )


def test_the_split_is_unknown_rather_than_wrong() -> None:
    assert byte_sources(MIB, None, snap(1, 0)) is None
    assert byte_sources(MIB, snap(1, 0), None) is None
    # juicefs was remounted during the warmup: a new process, counters from zero.
    assert byte_sources(MIB, snap(1, 9 * MIB), snap(2, MIB)) is None
    assert byte_sources(MIB, snap(1, 9 * MIB), snap(1, MIB)) is None
    # A whole block fetched for a model that uses part of it: never above the total.
    capped = byte_sources(MIB, snap(1, 0), snap(1, 4 * MIB))
    assert capped is not None
    assert capped.from_store == MIB
    assert capped.from_cache == 0


def node_settings(**extra: str) -> Settings:
    return Settings.from_env(
        minimal_env(
            JFS_CACHE_MODE="node",
            JFS_CACHE_SIZE_MIB="921",
            JFS_NODE_CACHE_BUDGET_MIB="1024",
            JFS_CACHE_SCAN_SECONDS="7",
            **extra,
        )
    )


def test_node_mode_mounts_with_the_budget_and_a_frequent_scan() -> None:
    settings = node_settings()
    assert settings.cache_mode == "node"
    assert settings.node_cache_budget_mib == 1024
    command = JuiceFSMount(settings.mount_spec()).command()
    assert command[command.index("--cache-dir") + 1] == "/c"
    assert command[command.index("--cache-size") + 1] == "921"
    assert command[command.index("--cache-eviction") + 1] == "lru"
    assert command[command.index("--cache-scan-interval") + 1] == "7s"


def test_pod_mode_and_no_disk_cache_keep_juicefs_defaults() -> None:
    pod = Settings.from_env(minimal_env(JFS_CACHE_MODE="pod"))
    assert "--cache-scan-interval" not in JuiceFSMount(pod.mount_spec()).command()
    # A slow disk with ssd policy required mounts without a disk cache.
    none = JuiceFSMount(node_settings().mount_spec(0)).command()
    assert none[none.index("--cache-size") + 1] == "0"
    assert "--cache-scan-interval" not in none


def test_the_metrics_endpoint_is_known_once_started_and_fixed_for_that_process() -> None:
    mount = JuiceFSMount(node_settings().mount_spec())
    assert mount.metrics_url is None
    assert mount.generation == 0


def test_cache_probes_of_pods_sharing_a_directory_do_not_collide(tmp_path: Path) -> None:
    async def both() -> None:
        await asyncio.gather(
            asyncio.to_thread(measure, tmp_path, 8), asyncio.to_thread(measure, tmp_path, 8)
        )

    asyncio.run(both())
    assert list(tmp_path.iterdir()) == []


@dataclass
class ServedMetrics:
    """Stands in for juicefs's metrics: texts[i] answers request i (the last repeats)."""

    texts: list[str] = field(default_factory=lambda: [""])
    generation: int = 1
    requests: list[str] = field(default_factory=list)
    metrics_url: str | None = None


@pytest.fixture
def served() -> Iterator[ServedMetrics]:
    state = ServedMetrics()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            body = state.texts[min(len(state.requests), len(state.texts)) - 1].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.metrics_url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def get_bytes_text(value: int) -> str:
    return f'juicefs_object_request_data_bytes{{method="GET"}} {value}\n'


class MessageReporter(FakeReporter):
    """Records each Event's message too."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: dict[str, str] = {}

    async def event(self, kind: str, reason: str, message: str) -> None:
        await super().event(kind, reason, message)
        self.messages[reason] = message


def test_models_ready_says_how_much_came_from_the_cache(
    tmp_path: Path, served: ServedMetrics
) -> None:
    bento = published_bento(tmp_path)
    settings = replace(settings_for(bento), cache_mode="node")
    # Before the warmup, then after it: the store sent 1 MiB in between.
    served.texts = [get_bytes_text(1000), get_bytes_text(1000 + MIB)]
    reporter = MessageReporter()
    counters = MountCounters(served)
    assert asyncio.run(verify_model(settings, bento, reporter, counters)) is True
    total = sum(f.stat().st_size for f in bento.models_dir.rglob("*") if f.is_file())
    ready = reporter.messages["ModelsReady"]
    cached = (total - MIB) / MIB
    assert f"; {cached:.0f} MiB ({(total - MIB) / total:.1%}) from the node cache" in ready
    assert "1 MiB from the object store" in ready
    assert len(served.requests) == 2  # before and after


def test_models_ready_says_so_when_the_split_is_unknown(
    tmp_path: Path, served: ServedMetrics
) -> None:
    bento = published_bento(tmp_path)
    served.metrics_url = "http://127.0.0.1:9/metrics"  # nothing listens there
    reporter = MessageReporter()
    assert (
        asyncio.run(verify_model(settings_for(bento), bento, reporter, MountCounters(served)))
        is True
    )
    assert "bytes by source unknown" in reporter.messages["ModelsReady"]


def test_after_verifying_the_sidecar_completes_the_cache_with_every_file(tmp_path: Path) -> None:
    bento = published_bento(tmp_path)
    filler = RecordingFiller()
    reporter = MessageReporter()
    assert asyncio.run(verify_model(settings_for(bento), bento, reporter, filler=filler)) is True
    model_files = {f for f in bento.models_dir.rglob("*") if f.is_file()}
    assert len(filler.asked) == 1
    assert set(filler.asked[0]) == model_files


@pytest.mark.parametrize(
    "filler",
    [
        RecordingFiller(fail_with=MountError("juicefs warmup exited with code 1")),
        RecordingFiller(fail_with=OSError("no such file: juicefs")),
        RecordingFiller(hang=True),
    ],
    ids=["warmup-fails", "no-juicefs", "warmup-hangs"],
)
def test_a_cache_fill_that_fails_leaves_the_verified_model_ready(
    tmp_path: Path, filler: RecordingFiller
) -> None:
    bento = published_bento(tmp_path)
    # The fill gets what is left of the warmup deadline, at least a second.
    settings = replace(settings_for(bento), warmup_timeout_seconds=1)
    reporter = MessageReporter()
    with capture_logs() as logs:
        assert asyncio.run(verify_model(settings, bento, reporter, filler=filler)) is True
    assert "ModelsReady" in reporter.messages
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["cache.fill_failed"]


# -- the agent seals before this pod mounts -------------------------------------------


@dataclass
class SealingAgent:
    """An AgentChannel whose seal is recorded, fails with `error`, or waits on `hold`."""

    order: list[str]
    error: BaseException | None = None
    hold: asyncio.Event | None = None
    served_copy: bool = False

    def sibling(self, reply_timeout: float | None) -> SealingAgent:
        return self

    async def seal(self) -> bool:
        self.order.append("seal")
        if self.hold is not None:
            await self.hold.wait()
        if self.error is not None:
            raise self.error
        return self.served_copy

    def close(self) -> None:
        self.order.append("closed")


def _seal(tmp_path: Path, agent: SealingAgent, stop_first: bool = False) -> object:
    settings = settings_for(published_bento(tmp_path))

    async def scenario() -> object:
        stop = asyncio.Event()
        stopping = asyncio.create_task(stop.wait())
        if stop_first:
            asyncio.get_running_loop().call_later(0.05, stop.set)
        try:
            sealing = open_gate_sealed(
                settings,
                agent,  # type: ignore[arg-type]
                FakeReporter(),
                SidecarMetrics(),
            )
            return await sidecar_run._unless_stopped(sealing, stopping)
        finally:
            stopping.cancel()

    return asyncio.run(scenario())


def test_a_seal_answers_none_and_the_sidecar_mounts_next(tmp_path: Path) -> None:
    order: list[str] = []
    assert _seal(tmp_path, SealingAgent(order)) == SealOutcome()
    assert order == ["seal", "closed"]


def test_a_seal_from_the_node_s_copy_says_so(tmp_path: Path) -> None:
    assert _seal(tmp_path, SealingAgent([], served_copy=True)) == SealOutcome(served_copy=True)


def test_a_refused_seal_is_why_and_this_pod_then_verifies(tmp_path: Path) -> None:
    refused = _seal(tmp_path, SealingAgent([], error=AgentError("the cache disk is full")))
    assert refused == SealOutcome(refused="the cache disk is full")


def test_sigterm_while_the_agent_warms_ends_the_wait(tmp_path: Path) -> None:
    agent = SealingAgent([], hold=asyncio.Event())
    assert _seal(tmp_path, agent, stop_first=True) is sidecar_run._STOPPED
    assert agent.order == ["seal", "closed"]


def test_only_a_lent_node_cache_with_warmup_seals_before_mounting() -> None:
    verify = GatePlan(verify=True, reason="", message="")
    mounted = GatePlan(verify=False, reason="", message="")
    assert seal_before_mount(True, verify)
    assert not seal_before_mount(True, mounted)
    assert not seal_before_mount(False, verify)


@dataclass
class CopyServingAgent:
    """An AgentChannel whose seal says the node's local copy serves the models."""

    order: list[str]

    def sibling(self, reply_timeout: float | None) -> CopyServingAgent:
        return self

    async def seal(self) -> bool:
        self.order.append("seal")
        return True

    async def expose(self) -> None:
        self.order.append("expose")

    async def mount(self) -> int:
        self.order.append("mount")
        raise AgentError("no FUSE for a pod the copy serves")

    async def unmount(self) -> None:
        self.order.append("unmount")

    def close(self) -> None:
        self.order.append("closed")


def test_a_pod_the_node_s_copy_serves_mounts_no_juicefs(tmp_path: Path) -> None:
    """Sealed from the copy: the agent's bind is the app's view; no juicefs runs, and the
    bind is taken down on SIGTERM."""
    settings = replace(settings_for(published_bento(tmp_path)), cache_mode="node")
    agent = CopyServingAgent([])
    shown = ModelsShown()

    async def scenario() -> tuple[int, Recorder]:
        stop = asyncio.Event()
        recorder = Recorder(stop)
        code = await asyncio.wait_for(
            sidecar_run.run(settings, recorder, stop, agent=agent, shown=shown),  # type: ignore[arg-type]
            60,
        )
        return code, recorder

    code, recorder = asyncio.run(scenario())
    assert code == 0
    assert shown.is_set()  # the startup probe passes: the app may start
    assert agent.order == ["seal", "closed", "expose", "unmount"]
    assert recorder.reasons()[-3:] == ["Ready", "MountReady", "Unmounted"]
    ready = next(m for _, _, r, m in recorder.said if r == "MountReady")
    assert "no JuiceFS client runs in this pod" in ready
