"""The sidecar's own Prometheus metrics (sidecar/metrics.py) and where run.py records them.

The recording functions on their own, then the sidecar's warmup and gate on
a published Bento in a plain directory (as tests/test_sidecar_decisions.py
runs them), then the endpoint over real HTTP. The endpoint on a real pod is
tests/e2e/test_sidecar_metrics.py.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common import env
from common.durations import DURATION_BUCKETS
from common.ports import port_is_free
from modelstore.sources import ByteSources, JuiceFSCounters, MountCounters, Snapshot
from modelstore.streamer import Progress
from sidecar import run as sidecar_run
from sidecar.decisions import CachePlan, gate_plan
from sidecar.gate import open_gate
from sidecar.metrics import FAILURE_REASONS, STATES, SidecarMetrics
from sidecar.startup import ModelsShown, startup_answer, startup_app
from sidecar.verify import verify_model
from tests.helpers import flip_middle_byte
from tests.kit.sidecar import FakeReporter, PublishedBento, published_bento, settings_for

MIB = 1 << 20
PREFIX = "bento_juicefs_sidecar_"


def value(metrics: SidecarMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(PREFIX + name, labels)


def state(metrics: SidecarMetrics) -> str:
    (current,) = [s for s in STATES if value(metrics, "state", state=s) == 1]
    return current


def model_bytes(bento: PublishedBento) -> int:
    return sum(f.stat().st_size for f in bento.models_dir.rglob("*") if f.is_file())


# --- the recording functions ----------------------------------------------------


def test_a_new_sidecar_is_starting_with_every_series_at_zero() -> None:
    metrics = SidecarMetrics()
    assert state(metrics) == "starting"
    for reason in FAILURE_REASONS:
        assert value(metrics, "warmup_failures_total", reason=reason) == 0
    for name in ("streamed_bytes_total", "verified_bytes_total", "cache_bytes_total"):
        assert value(metrics, name) == 0
    # Only once the gate opens: no time to ready before.
    assert value(metrics, "time_to_ready_seconds") == 0


def test_the_info_metric_names_the_bento() -> None:
    metrics = SidecarMetrics()
    metrics.describe(settings_for(PublishedBento(Path("/unused"))))
    labels = {"bento": "llama3-service", "version": "v1", "volume": "models", "cache_mode": "node"}
    assert value(metrics, "info", **labels) == 1


def test_the_stream_is_counted_as_it_goes_then_once_verified() -> None:
    metrics = SidecarMetrics()
    metrics.stream_started(10 * MIB)
    assert state(metrics) == "streaming"
    assert value(metrics, "model_bytes") == 10 * MIB
    # Begun 2 s ago: the duration is the stream's, the throughput its bytes over it.
    progress = Progress(total_bytes=10 * MIB, total_files=2, started=time.monotonic() - 2)
    for done in (4 * MIB, 8 * MIB, 8 * MIB):  # the same progress reported twice counts once
        progress.done_bytes = done
        metrics.stream_progressed(progress)
    assert value(metrics, "streamed_bytes_total") == 8 * MIB
    assert value(metrics, "verified_bytes_total") == 0
    progress.done_bytes = 10 * MIB
    sources = ByteSources(total=10 * MIB, from_store=3 * MIB, store_gets=1, cache_hit_bytes=0)
    metrics.stream_verified(progress, sources)
    assert value(metrics, "streamed_bytes_total") == 10 * MIB
    assert value(metrics, "verified_bytes_total") == 10 * MIB
    assert value(metrics, "cache_bytes_total") == 7 * MIB
    assert value(metrics, "store_bytes_total") == 3 * MIB
    assert value(metrics, "stream_duration_seconds") == pytest.approx(2, abs=0.5)
    assert value(metrics, "stream_bytes_per_second") == pytest.approx(5 * MIB, rel=0.2)


def test_an_unknown_split_counts_no_bytes_to_either_source() -> None:
    metrics = SidecarMetrics()
    progress = Progress(total_bytes=MIB, total_files=1, done_bytes=MIB)
    metrics.stream_verified(progress, None)
    assert value(metrics, "verified_bytes_total") == MIB
    assert value(metrics, "cache_bytes_total") == value(metrics, "store_bytes_total") == 0


def test_time_to_ready_counts_from_the_sidecar_start() -> None:
    metrics = SidecarMetrics(started=100.0)
    metrics.gate_opened(now=112.5)
    assert value(metrics, "time_to_ready_seconds") == 12.5
    assert state(metrics) == "ready"


def test_the_durations_are_histograms_too() -> None:
    """One observation each per pod, in the shared buckets: a query over many pods can
    count those ready within a bound (the chart's time-to-ready alert)."""
    metrics = SidecarMetrics(started=100.0)
    for name in ("time_to_ready_histogram_seconds", "stream_duration_histogram_seconds"):
        assert value(metrics, name + "_count") == 0  # exported from the start, at 0
        assert value(metrics, name + "_bucket", le="+Inf") == 0
    progress = Progress(total_bytes=MIB, total_files=1, started=time.monotonic() - 20)
    progress.done_bytes = MIB
    metrics.stream_verified(progress, None)
    metrics.gate_opened(now=100.0 + 42)
    assert value(metrics, "time_to_ready_histogram_seconds_count") == 1
    assert value(metrics, "time_to_ready_histogram_seconds_sum") == 42
    assert value(metrics, "time_to_ready_histogram_seconds_bucket", le="30.0") == 0
    assert value(metrics, "time_to_ready_histogram_seconds_bucket", le="60.0") == 1
    assert value(metrics, "stream_duration_histogram_seconds_count") == 1
    assert value(metrics, "stream_duration_histogram_seconds_bucket", le="15.0") == 0
    assert value(metrics, "stream_duration_histogram_seconds_bucket", le="30.0") == 1
    # The gauges keep the pod's own figure.
    assert value(metrics, "time_to_ready_seconds") == 42
    assert value(metrics, "stream_duration_seconds") == pytest.approx(20, abs=0.5)
    bounds = [
        float(sample.labels["le"])
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        if family.name == PREFIX + "time_to_ready_histogram_seconds"
        for sample in family.samples
        if sample.name.endswith("_bucket") and sample.labels["le"] != "+Inf"
    ]
    assert tuple(bounds) == DURATION_BUCKETS
    assert DURATION_BUCKETS[0] == 1
    assert 1800 in DURATION_BUCKETS


def test_a_failure_is_counted_by_reason_and_the_sidecar_is_failed() -> None:
    metrics = SidecarMetrics()
    metrics.warmup_failed("WarmupTimedOut")
    assert value(metrics, "warmup_failures_total", reason="WarmupTimedOut") == 1
    assert value(metrics, "warmup_failures_total", reason="VerificationFailed") == 0
    assert state(metrics) == "failed"


# --- recorded where the sidecar computes them -------------------------------------


@dataclass
class FixedCounters(MountCounters):
    """juicefs's counters as given: one snapshot per call (before, then after the stream)."""

    snapshots: list[Snapshot] = field(default_factory=list)

    async def snapshot(self) -> Snapshot | None:
        return self.snapshots.pop(0)


def snapshot(get_bytes: int) -> Snapshot:
    return Snapshot(1, JuiceFSCounters(get_bytes=get_bytes, gets=get_bytes // (4 * MIB)))


def test_warm_records_the_verified_model_and_where_its_bytes_came_from(tmp_path: Path) -> None:
    bento = published_bento(tmp_path)
    metrics = SidecarMetrics()
    # The object store sent 1 MiB during the stream: the rest came from the cache.
    counters = FixedCounters(mount=None, snapshots=[snapshot(5 * MIB), snapshot(6 * MIB)])  # type: ignore[arg-type]
    reporter = FakeReporter()
    assert asyncio.run(
        verify_model(settings_for(bento), bento, reporter, counters, metrics=metrics)
    )
    total = model_bytes(bento)
    assert value(metrics, "model_bytes") == total
    assert value(metrics, "streamed_bytes_total") == total
    assert value(metrics, "verified_bytes_total") == total
    assert value(metrics, "store_bytes_total") == MIB
    assert value(metrics, "cache_bytes_total") == total - MIB
    # verify_model() alone does not open the gate: open_gate does.
    assert state(metrics) == "streaming"


def test_open_gate_records_the_time_to_ready(tmp_path: Path) -> None:
    bento = published_bento(tmp_path)
    metrics = SidecarMetrics()
    gate = gate_plan(True, CachePlan(18432))
    asyncio.run(open_gate(settings_for(bento), bento, FakeReporter(), gate, metrics=metrics))
    assert state(metrics) == "ready"
    seconds = value(metrics, "time_to_ready_seconds")
    assert seconds is not None
    assert seconds > 0
    assert value(metrics, "verified_bytes_total") == model_bytes(bento)


def test_warmup_off_is_ready_without_streaming(tmp_path: Path) -> None:
    bento = PublishedBento(tmp_path / "nothing-published-yet")
    metrics = SidecarMetrics()
    gate = gate_plan(False, CachePlan(18432))
    asyncio.run(open_gate(settings_for(bento), bento, FakeReporter(), gate, metrics=metrics))
    assert state(metrics) == "ready"
    assert value(metrics, "verified_bytes_total") == 0


def test_bytes_that_differ_from_the_manifest_count_a_verification_failure(
    tmp_path: Path,
) -> None:
    bento = published_bento(tmp_path)
    shard = bento.models_dir / "llama3" / "v1" / "model.safetensors"
    flip_middle_byte(shard)
    metrics = SidecarMetrics()
    gate = gate_plan(True, CachePlan(18432))
    asyncio.run(open_gate(settings_for(bento), bento, FakeReporter(), gate, metrics=metrics))
    assert value(metrics, "warmup_failures_total", reason="VerificationFailed") == 1
    assert state(metrics) == "failed"
    assert value(metrics, "verified_bytes_total") == 0
    assert value(metrics, "time_to_ready_seconds") == 0


def test_an_unreadable_manifest_counts_a_warmup_failure(tmp_path: Path) -> None:
    bento = published_bento(tmp_path)
    (bento.bento_dir / "manifest.json").write_text("{not json")
    metrics = SidecarMetrics()
    gate = gate_plan(True, CachePlan(18432))
    asyncio.run(open_gate(settings_for(bento), bento, FakeReporter(), gate, metrics=metrics))
    assert value(metrics, "warmup_failures_total", reason="WarmupFailed") == 1
    assert state(metrics) == "failed"


# --- the endpoint -----------------------------------------------------------------


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> (labels, value) of each sample, as Prometheus would parse them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_the_endpoint_serves_the_registry_and_releases_its_port_on_close() -> None:
    metrics = SidecarMetrics()
    metrics.stream_started(3 * MIB)
    endpoint = metrics.serve(0, host="127.0.0.1")
    try:
        samples = scrape(endpoint.port)
    finally:
        endpoint.close()
    assert samples[PREFIX + "model_bytes"] == [({}, 3 * MIB)]
    assert ({"state": "streaming"}, 1) in samples[PREFIX + "state"]
    assert PREFIX + "verified_bytes_total" in samples
    # Only the sidecar's own registry: no process or Python collectors of the global one.
    assert all(name.startswith(PREFIX) for name in samples)
    assert port_is_free(endpoint.port)
    assert not endpoint.thread.is_alive()


def test_a_sidecar_on_its_way_out_does_not_wait_for_the_endpoint() -> None:
    endpoint = SidecarMetrics().serve(0, host="127.0.0.1")
    closer = endpoint.close_in_background()
    assert closer is not threading.current_thread()
    assert closer.daemon  # exiting does not wait for it
    closer.join(5)
    assert not closer.is_alive()
    assert port_is_free(endpoint.port)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something already listens on, on every address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def test_a_taken_port_costs_the_metrics_only_and_says_so(taken_port: int) -> None:
    reporter = FakeReporter()

    async def serve() -> object:
        return await sidecar_run._serve_metrics(
            SidecarMetrics(), taken_port, reporter, ModelsShown()
        )

    assert asyncio.run(serve()) is None
    assert reporter.said == [("event", "MetricsUnavailable")]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_the_startup_answer_is_200_once_shown_and_503_with_the_reason_before() -> None:
    assert startup_answer(True) == ("200 OK", "models shown\n")
    status, text = startup_answer(False)
    assert status.startswith("503 ")
    assert "models not shown yet" in text
    assert "Events" in text


def test_the_startup_path_holds_the_probe_until_the_models_are_shown() -> None:
    """The kubelet's GET waits for the models (up to the wait), and the metrics stay
    on every other path."""
    shown = ModelsShown()
    routes = {env.STARTUP_PATH: startup_app(shown, 0.3)}
    endpoint = SidecarMetrics().serve(0, host="127.0.0.1", routes=routes)
    try:
        started = time.monotonic()
        status, text = get(endpoint.port, env.STARTUP_PATH)
        assert (status, time.monotonic() - started >= 0.3) == (503, True)
        assert "models not shown yet" in text
        assert PREFIX + "state" in scrape(endpoint.port)
        # Shown while a probe waits: it answers then, not at the end of its wait.
        threading.Timer(0.1, shown.set).start()
        assert get(endpoint.port, env.STARTUP_PATH) == (200, "models shown\n")
    finally:
        endpoint.close()
    assert port_is_free(endpoint.port)


def test_a_default_endpoint_answers_on_ipv4_whether_or_not_the_pod_has_ipv6() -> None:
    endpoint = SidecarMetrics().serve(0, routes={env.STARTUP_PATH: startup_app(ModelsShown(), 0)})
    try:
        assert get(endpoint.port, env.STARTUP_PATH)[0] == 503
    finally:
        endpoint.close()


def test_port_zero_serves_nothing() -> None:
    reporter = FakeReporter()

    async def serve() -> object:
        return await sidecar_run._serve_metrics(SidecarMetrics(), 0, reporter, ModelsShown())

    assert asyncio.run(serve()) is None
    assert reporter.said == []
