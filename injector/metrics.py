"""The injector's Prometheus metrics, one registry per app."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bento_juicefs_admission_requests",
            "AdmissionReview requests by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bento_juicefs_admission_duration_seconds",
            "Time to answer an AdmissionReview, body read to response",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.cert_reloads = Counter(
            "bento_juicefs_certificate_reloads",
            "Serving certificate reloads",
            registry=self.registry,
        )


METRICS = web.AppKey("metrics", Metrics)
