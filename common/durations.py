"""Histogram buckets for the durations of a pod's start (seconds).

Shared by the sidecar's time to ready and stream duration and the node
agent's warm duration: 1 s (a warm node cache, a small model) to 30 min (a
cold start of a large model over a slow link), and the warmup's default
timeout (an hour) above it. The chart's time-to-ready alert counts the pods
ready within one of these bounds (`metrics.prometheusRule.timeToReady.seconds`,
which the chart's schema limits to them).
"""

from __future__ import annotations

DURATION_BUCKETS: tuple[float, ...] = (
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    30.0,
    60.0,
    120.0,
    180.0,
    300.0,
    600.0,
    900.0,
    1200.0,
    1800.0,
    3600.0,
)
