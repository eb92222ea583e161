"""Every check on one fetched state, in the order of the table."""

from __future__ import annotations

import datetime as dt

from injector.check.agent import check_node_agent
from injector.check.credentials import check_credentials
from injector.check.endpoints import check_endpoints
from injector.check.namespaces import check_namespaces
from injector.check.nodes import check_ssd_nodes, check_streaming_nodes
from injector.check.pods import check_image_skew, check_not_injected, check_stuck_gates
from injector.check.rows import Row
from injector.check.state import ClusterState
from injector.check.version import check_version
from injector.check.webhook import check_ca_bundle
from injector.config import InjectorConfig


def run_checks(
    state: ClusterState, config: InjectorConfig, now: dt.datetime | None = None
) -> list[Row]:
    """Every check's rows, in the order of the table."""
    now = now or dt.datetime.now(dt.UTC)
    return [
        *check_version(state.version, config),
        *check_ssd_nodes(state.nodes, config),
        *check_streaming_nodes(state.nodes, config),
        *check_ca_bundle(state.webhook, state.ca_secret, config, now),
        *check_endpoints(state.webhook, state.endpoints, config, now),
        *check_namespaces(state.namespaces, config),
        *check_credentials(state.namespaces, state.sources, state.copies, config),
        *check_node_agent(state.nodes, state.daemonset, state.agent_pods, config),
        *check_not_injected(state.bento_pods, config),
        *check_image_skew(state.bento_pods, config),
        *check_stuck_gates(state.bento_pods, config, now),
    ]
