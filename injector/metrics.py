"""The injector's Prometheus metrics, one registry per app."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Every outcome a request can end in (docs/metrics.md): the review's decision
# (injector.admission.Outcome), or how the server turned it away.
OUTCOMES = (
    "injected",
    "unchanged",
    "skipped",
    "denied",
    "error",
    "bad_request",
    "too_large",
    "body_timeout",
    "overloaded",
)
# Why a replica wrote the shared CA Secret (injector.pki.ca_keeper).
CA_SECRET_WRITE_REASONS = ("missing", "invalid")


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
        self.in_flight = Gauge(
            "bento_juicefs_admission_reviews_in_flight",
            "Large-body AdmissionReviews in a worker thread or queued for one "
            "(at most server.maxReviewsInFlight)",
            registry=self.registry,
        )
        self.cert_reloads = Counter(
            "bento_juicefs_certificate_reloads",
            "Serving certificate reloads",
            registry=self.registry,
        )
        self.cert_expiry = Gauge(
            "bento_juicefs_certificate_expiry_timestamp_seconds",
            "When the serving certificate in use expires (Unix time)",
            registry=self.registry,
        )
        self.ca_bundle_patches = Counter(
            "bento_juicefs_ca_bundle_patches",
            "caBundle patches of the webhook configuration made by this replica",
            registry=self.registry,
        )
        self.ca_switches = Counter(
            "bento_juicefs_ca_switches",
            "Times this replica moved its serving certificate to a new shared CA",
            registry=self.registry,
        )
        self.ca_repairs = Counter(
            "bento_juicefs_ca_secret_writes",
            "Shared CA Secrets this replica wrote: missing, or invalid (empty, corrupt, expiring)",
            ["reason"],
            registry=self.registry,
        )
        # Every outcome and reason from the start, at 0: a panel or an alert on
        # denials, errors or CA writes shows 0 rather than no data, and increase()
        # sees the first one.
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for reason in CA_SECRET_WRITE_REASONS:
            self.ca_repairs.labels(reason)


METRICS = web.AppKey("metrics", Metrics)
