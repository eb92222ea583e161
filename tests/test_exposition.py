"""The /metrics endpoint of the sidecar and the agent, with juicefs's metrics relayed
(modelstore/exposition.py): splitting and merging expositions, then over real HTTP.

A real juicefs behind the relay, scraped by a real Prometheus from the pod's IP, is
tests/e2e/test_prometheus.py.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.types import StartResponse, WSGIEnvironment

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from common.ports import free_port
from modelstore.exposition import (
    JuiceFSRelay,
    MetricsEndpoint,
    families,
    merge_expositions,
    serve_http,
    serve_metrics,
)


def juicefs_text(mp: str, hits: int) -> str:
    """What juicefs 1.4 writes on --metrics, cut down: a counter without _total, a
    histogram, a gauge, and the Go runtime's families."""
    labels = f'mp="{mp}",vol_name="models"'
    return f"""# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 42
# HELP juicefs_blockcache_hit_bytes read bytes from cached block
# TYPE juicefs_blockcache_hit_bytes counter
juicefs_blockcache_hit_bytes{{{labels}}} {hits}
# HELP juicefs_fuse_ops_durations_histogram_seconds Operations latency distributions.
# TYPE juicefs_fuse_ops_durations_histogram_seconds histogram
juicefs_fuse_ops_durations_histogram_seconds_bucket{{method="read",{labels},le="0.01"}} 3
juicefs_fuse_ops_durations_histogram_seconds_bucket{{method="read",{labels},le="+Inf"}} 4
juicefs_fuse_ops_durations_histogram_seconds_sum{{method="read",{labels}}} 0.05
juicefs_fuse_ops_durations_histogram_seconds_count{{method="read",{labels}}} 4
# HELP juicefs_uptime Total running time in seconds.
# TYPE juicefs_uptime gauge
juicefs_uptime{{{labels}}} 12.5
"""


def test_an_exposition_splits_into_its_families_with_their_samples() -> None:
    found = families(juicefs_text("/jfs/a", 7) + "juicefs_stray 1\n# a comment\n\n")
    assert [f.name for f in found] == [
        "go_goroutines",
        "juicefs_blockcache_hit_bytes",
        "juicefs_fuse_ops_durations_histogram_seconds",
        "juicefs_uptime",
        "juicefs_stray",
    ]
    histogram = found[2]
    assert [line.split()[1] for line in histogram.meta] == ["HELP", "TYPE"]
    assert len(histogram.samples) == 4
    # A sample of no announced family is a family of its own, untyped.
    assert found[-1].meta == []
    assert found[-1].samples == ["juicefs_stray 1"]


def test_several_juicefs_merge_into_one_family_each_and_only_juicefs_families() -> None:
    merged = merge_expositions([juicefs_text("/jfs/a", 7), juicefs_text("/jfs/b", 9)])
    assert "go_goroutines" not in merged
    assert merged.count("# TYPE juicefs_blockcache_hit_bytes counter") == 1
    parsed = {f.name: f for f in text_string_to_metric_families(merged)}
    # Names unchanged: a counter juicefs wrote without _total keeps its name.
    assert "juicefs_blockcache_hit_bytes_total" not in merged
    hits = {s.labels["mp"]: s.value for s in parsed["juicefs_blockcache_hit_bytes"].samples}
    assert hits == {"/jfs/a": 7, "/jfs/b": 9}
    histogram = parsed["juicefs_fuse_ops_durations_histogram_seconds"]
    assert histogram.type == "histogram"
    assert len(histogram.samples) == 8


def test_a_series_two_texts_repeat_is_kept_once() -> None:
    merged = merge_expositions([juicefs_text("/jfs/a", 7), juicefs_text("/jfs/a", 8)])
    (family,) = [f for f in families(merged) if f.name == "juicefs_blockcache_hit_bytes"]
    assert family.samples == ['juicefs_blockcache_hit_bytes{mp="/jfs/a",vol_name="models"} 7']


def test_nothing_to_relay_is_an_empty_exposition() -> None:
    assert merge_expositions([]) == ""
    assert merge_expositions(["# HELP go_x x\n# TYPE go_x gauge\ngo_x 1\n"]) == ""


@dataclass
class Source:
    """A juicefs as the relay sees it (modelstore.sources.Counted)."""

    metrics_url: str | None
    generation: int = 1


@pytest.fixture
def juicefs_endpoints() -> Iterator[list[str]]:
    """Two stand-ins for juicefs's --metrics endpoint on 127.0.0.1."""
    servers = []
    for mp, hits in (("/jfs/a", 7), ("/jfs/b", 9)):
        body = juicefs_text(mp, hits).encode()

        def app(
            environ: WSGIEnvironment, start_response: StartResponse, body: bytes = body
        ) -> list[bytes]:
            start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4")])
            return [body]

        servers.append(serve_http(0, "127.0.0.1", app))
    try:
        yield [f"http://127.0.0.1:{s.server_address[1]}/metrics" for s, _ in servers]
    finally:
        for server, _ in servers:
            server.shutdown()
            server.server_close()


def scrape(endpoint: MetricsEndpoint) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=5) as r:
        return r.headers["Content-Type"], r.read().decode()


def test_the_endpoint_serves_its_registry_then_the_juicefs_that_answer(
    juicefs_endpoints: list[str],
) -> None:
    registry = CollectorRegistry()
    Gauge("bento_juicefs_sidecar_model_bytes", "model bytes", registry=registry).set(5)
    relay = JuiceFSRelay(timeout=1.0)
    for url in juicefs_endpoints:
        relay.add(Source(url))
    relay.add(Source(None))  # not started yet
    relay.add(Source(f"http://127.0.0.1:{free_port()}/metrics"))  # gone
    endpoint = serve_metrics(registry, 0, "127.0.0.1", relay)
    try:
        content_type, text = scrape(endpoint)
    finally:
        endpoint.close()
    assert content_type.startswith("text/plain; version=0.0.4")
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert parsed["bento_juicefs_sidecar_model_bytes"].samples[0].value == 5
    hits = {s.labels["mp"] for s in parsed["juicefs_blockcache_hit_bytes"].samples}
    assert hits == {"/jfs/a", "/jfs/b"}


def test_a_removed_juicefs_is_no_longer_relayed(juicefs_endpoints: list[str]) -> None:
    relay = JuiceFSRelay()
    first, second = (Source(url) for url in juicefs_endpoints)
    relay.add(first)
    relay.add(second)
    relay.remove(first)
    relay.remove(first)  # twice: a no-op
    text = relay.text()
    assert 'mp="/jfs/b"' in text
    assert 'mp="/jfs/a"' not in text
