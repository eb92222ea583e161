"""The sidecar's own Prometheus metrics: what it streamed, from where, how fast, when it was ready.

One registry per sidecar (never prometheus_client's global one, so a test
or the node agent's warms record into their own), served over plain HTTP on
the pod's IP at `sidecar.metricsPort` (the container port `metrics`) for as
long as the sidecar runs, which is the pod's life: it holds the FUSE mount.
The pod's juicefs's own metrics follow on the same endpoint, relayed
(`modelstore.exposition`).

Which Bento a pod serves is said once, by `bento_juicefs_sidecar_info`
(value 1, labels bento, version, volume, cache_mode), not repeated as
labels on every series. That is Prometheus's advice for labels every series
of a target would carry (an "info" metric, as `kube_pod_info` or
`node_uname_info`): the other series keep small, stable label sets, and a
query groups them by Bento by joining on the target labels the PodMonitor
adds, e.g.
`sum by (bento) (bento_juicefs_sidecar_verified_bytes_total * on (namespace, pod)
group_left (bento) bento_juicefs_sidecar_info)`.
A pod's identity cannot change while it runs, so the join never sees two.

The figures are the ones the sidecar already computes for its Events and
logs (`Progress` from the streamer, `ByteSources` from juicefs's counters);
run.py records each where it computes it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Literal, get_args
from wsgiref.types import WSGIApplication

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.durations import DURATION_BUCKETS
from modelstore.exposition import JuiceFSRelay, MetricsEndpoint, serve_metrics
from modelstore.sources import ByteSources
from modelstore.streamer import Progress
from sidecar.env import Settings

# starting: probing the cache disk, mounting, waiting for the manifest;
# streaming: reading and verifying the model, completing the cache;
# ready: the readiness condition is True; failed: the gate stays closed
# (the reason is in warmup_failures and the pod's condition).
SidecarState = Literal["starting", "streaming", "ready", "failed"]
STATES: tuple[SidecarState, ...] = get_args(SidecarState)
# The Event (and condition) reasons of a warmup that leaves the gate closed;
# SealFailed (node cache mode: the node agent could not seal the model) leaves it
# closed until this pod has verified the model itself (VerifyingUnsealed).
FAILURE_REASONS = ("VerificationFailed", "WarmupTimedOut", "WarmupFailed", "SealFailed")


class SidecarMetrics:
    def __init__(self, started: float | None = None) -> None:
        # The sidecar's start: time_to_ready counts from here (time.monotonic()).
        self.started = time.monotonic() if started is None else started
        # The streamer's done_bytes already counted into streamed_bytes.
        self._streamed = 0
        self.registry = CollectorRegistry()
        # The pod's juicefs, once mounted (relay.add): its metrics follow ours on /metrics.
        self.relay = JuiceFSRelay()
        self.info = Gauge(
            "bento_juicefs_sidecar_info",
            "The Bento this sidecar streams (always 1; join on namespace and pod)",
            ["bento", "version", "volume", "cache_mode"],
            registry=self.registry,
        )
        self.state = Gauge(
            "bento_juicefs_sidecar_state",
            "1 for the sidecar's current state (starting, streaming, ready, failed), 0 otherwise",
            ["state"],
            registry=self.registry,
        )
        self.model_bytes = Gauge(
            "bento_juicefs_sidecar_model_bytes",
            "Bytes of the model files the manifest lists for this pod",
            registry=self.registry,
        )
        self.streamed_bytes = Counter(
            "bento_juicefs_sidecar_streamed_bytes",
            "Bytes read through the mount and hashed so far, as the stream goes",
            registry=self.registry,
        )
        self.verified_bytes = Counter(
            "bento_juicefs_sidecar_verified_bytes",
            "Bytes verified against the manifest (counted once the whole model is)",
            registry=self.registry,
        )
        self.cache_bytes = Counter(
            "bento_juicefs_sidecar_cache_bytes",
            "Of the verified bytes, those read from the block cache",
            registry=self.registry,
        )
        self.store_bytes = Counter(
            "bento_juicefs_sidecar_store_bytes",
            "Of the verified bytes, those fetched from the object store",
            registry=self.registry,
        )
        self.stream_seconds = Gauge(
            "bento_juicefs_sidecar_stream_duration_seconds",
            "How long streaming and verifying the model took",
            registry=self.registry,
        )
        # The same durations as histograms, so that a query over many pods can ask
        # how many were ready within N seconds (the gauges stay: one pod's figure).
        self.stream_histogram = Histogram(
            "bento_juicefs_sidecar_stream_duration_histogram_seconds",
            "How long streaming and verifying the model took (one observation per stream)",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.stream_bytes_per_second = Gauge(
            "bento_juicefs_sidecar_stream_bytes_per_second",
            "The stream's throughput: verified bytes over its duration",
            registry=self.registry,
        )
        self.time_to_ready = Gauge(
            "bento_juicefs_sidecar_time_to_ready_seconds",
            "Seconds from the sidecar's start to the readiness condition set True",
            registry=self.registry,
        )
        self.time_to_ready_histogram = Histogram(
            "bento_juicefs_sidecar_time_to_ready_histogram_seconds",
            "Seconds from the sidecar's start to the readiness condition set True "
            "(one observation per pod)",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.warmup_failures = Counter(
            "bento_juicefs_sidecar_warmup_failures",
            "Warmups that left the gate closed, by reason (VerificationFailed, WarmupTimedOut, "
            "WarmupFailed)",
            ["reason"],
            registry=self.registry,
        )
        # Every known label value from the start, at 0: increase() then sees
        # the first failure, and a state query sees every state.
        for reason in FAILURE_REASONS:
            self.warmup_failures.labels(reason)
        self.set_state("starting")

    def describe(self, settings: Settings) -> None:
        self.info.labels(
            settings.bento_name, settings.bento_version, settings.volume, settings.cache_mode
        ).set(1)

    def set_state(self, current: SidecarState) -> None:
        for state in STATES:
            self.state.labels(state).set(1 if state == current else 0)

    def stream_started(self, model_bytes: int) -> None:
        self._streamed = 0
        self.model_bytes.set(model_bytes)
        self.set_state("streaming")

    def stream_progressed(self, progress: Progress) -> None:
        """The bytes the streamer read since its last report (its done_bytes never go back)."""
        if progress.done_bytes > self._streamed:
            self.streamed_bytes.inc(progress.done_bytes - self._streamed)
            self._streamed = progress.done_bytes

    def stream_verified(self, progress: Progress, sources: ByteSources | None) -> None:
        """The model is verified. sources: where its bytes came from, None when unknown."""
        self.stream_progressed(progress)
        self.verified_bytes.inc(progress.done_bytes)
        self.stream_seconds.set(progress.elapsed)
        self.stream_histogram.observe(progress.elapsed)
        self.stream_bytes_per_second.set(progress.bytes_per_s)
        if sources is not None:
            self.cache_bytes.inc(sources.from_cache)
            self.store_bytes.inc(sources.from_store)

    def warmup_failed(self, reason: str) -> None:
        self.warmup_failures.labels(reason).inc()
        self.set_state("failed")

    def gate_opened(self, now: float | None = None) -> None:
        """The readiness condition is True."""
        at = time.monotonic() if now is None else now
        self.time_to_ready.set(at - self.started)
        self.time_to_ready_histogram.observe(at - self.started)
        self.set_state("ready")

    def serve(
        self,
        port: int,
        host: str | None = None,
        routes: Mapping[str, WSGIApplication] | None = None,
    ) -> MetricsEndpoint:
        """Serve the metrics, and the relayed ones of the pod's juicefs, on host:port (port 0:
        one the kernel picks), and each path of routes by its own app; OSError if it cannot
        bind. host None: see modelstore.exposition.serve_http."""
        return serve_metrics(self.registry, port, host, self.relay, routes)
