"""The agent's Prometheus metrics: what its node cache holds, and what warming cost.

The juicefs processes of its warms add their own metrics to the same endpoint
while they run, relayed (`modelstore.exposition`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.durations import DURATION_BUCKETS
from common.warm import WARM_STATES, NodeWarmth
from modelstore.exposition import JuiceFSRelay, MetricsEndpoint, serve_metrics

# What a warm or an eviction can end in: the Event reason of a failure, or the state.
OUTCOMES = (
    "warm",
    "over-budget",
    "evicted",
    "WarmFailed",
    "VerificationFailed",
    "WarmupTimedOut",
    "EvictFailed",
)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The juicefs of each warm under way (warmer.mounted adds and removes them).
        self.relay = JuiceFSRelay()
        self.bentos = Gauge(
            "bento_juicefs_node_cache_bentos",
            "Bentos in the node's record, by state",
            ["state"],
            registry=self.registry,
        )
        self.held_bytes = Gauge(
            "bento_juicefs_node_cache_held_bytes",
            "Bytes of the Bentos warm or warming in the node cache (the budget's use)",
            registry=self.registry,
        )
        self.budget_bytes = Gauge(
            "bento_juicefs_node_cache_budget_bytes",
            "What the Bentos held together may take (JuiceFS's limit for the node cache)",
            registry=self.registry,
        )
        self.warmed_bytes = Counter(
            "bento_juicefs_node_agent_verified_bytes",
            "Bytes warmed and verified against their manifests",
            registry=self.registry,
        )
        self.store_bytes = Counter(
            "bento_juicefs_node_agent_store_bytes",
            "Bytes the agent's warms fetched from the object store",
            registry=self.registry,
        )
        self.warm_seconds = Counter(
            "bento_juicefs_node_agent_warm_seconds",
            "Seconds spent warming (with verified_bytes: the agent's MB/s)",
            registry=self.registry,
        )
        self.warm_duration = Histogram(
            "bento_juicefs_node_agent_warm_duration_seconds",
            "How long each warm that ended warm took (streamed and verified)",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.outcomes = Counter(
            "bento_juicefs_node_agent_outcomes",
            "What each warm or eviction ended in (warm, over-budget, failures by reason, evicted)",
            ["outcome"],
            registry=self.registry,
        )
        self.ready_to_warm = Gauge(
            "bento_juicefs_node_agent_ready_to_warm_seconds",
            "From the node turning Ready to the Bentos deployed for it warm (or given up on, "
            "see the NodeWarm and NodeWarmTimedOut Events), once per agent start",
            registry=self.registry,
        )
        # Every outcome from the start, at 0: increase() then sees the first failure.
        for outcome in OUTCOMES:
            self.outcomes.labels(outcome)

    def observe(self, warmth: NodeWarmth) -> None:
        records = warmth.records.values()
        for state in WARM_STATES:
            self.bentos.labels(state).set(sum(1 for r in records if r.state == state))
        self.held_bytes.set(sum(r.bytes for r in records if r.state in ("warm", "warming")))

    def serve(self, port: int) -> MetricsEndpoint:
        return serve_metrics(self.registry, port, "0.0.0.0", self.relay)
