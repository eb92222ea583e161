"""The check's small decisions, each on its own: which nodes, pods, addresses and bundles."""

from __future__ import annotations

import datetime as dt
from typing import Any

from common.warm import WARM_ANNOTATION, BentoRef, NodeWarmth, WarmRecord, WarmState
from injector.check.agent import (
    AgentOnNode,
    agent_nodes,
    agent_on_node,
    agent_pods_by_node,
    failed_warms,
    node_agent_row,
)
from injector.check.endpoints import (
    WebhookService,
    ready_addresses,
    service_port_name,
    webhook_service,
)
from injector.check.state import Unreadable
from injector.check.webhook import bundle_problems
from injector.config import InjectorConfig, NodeLabel
from injector.pki.authority import generate_ca

CONFIG = InjectorConfig()
HOME = "bento-juicefs-system"
SSD = NodeLabel(key="local-ssd", value="true")


def node(
    name: str, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}}}


def pod(name: str, node_name: str, *, owner: str = "ds-uid", ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "ownerReferences": [{"uid": owner}]},
        "spec": {"nodeName": node_name},
        "status": {
            "phase": "Running",
            "containerStatuses": [{"name": "agent", "ready": ready, "state": {"running": {}}}],
        },
    }


# -- the node agent


def test_agent_nodes_are_the_ssd_labelled_ones_by_name() -> None:
    nodes = [node("b", {"local-ssd": "true"}), node("a", {"local-ssd": "true"}), node("c")]
    assert [n["metadata"]["name"] for n in agent_nodes(nodes, SSD, {})] == ["a", "b"]


def test_agent_nodes_without_an_ssd_label_follow_the_daemonsets_selector() -> None:
    nodes = [node("a", {"pool": "ssd"}), node("b", {"pool": "hdd"})]
    assert [n["metadata"]["name"] for n in agent_nodes(nodes, None, {"pool": "ssd"})] == ["a"]
    # No label and no selector: nothing tells the agent's nodes apart.
    assert agent_nodes(nodes, None, {}) == []


def test_agent_pods_by_node_keeps_only_the_daemonsets_own_pods() -> None:
    mine, other = pod("agent-1", "n1"), pod("impostor", "n1", owner="other-uid")
    assert agent_pods_by_node([mine, other], "ds-uid") == {"n1": [mine]}
    # A DaemonSet without a uid (as read) cannot tell owners: every pod counts.
    assert agent_pods_by_node([mine, other], None) == {"n1": [mine, other]}


def test_agent_on_node_prefers_a_running_pod() -> None:
    found = agent_on_node([pod("a", "n", ready=False), pod("b", "n")], {}, HOME)
    assert found == AgentOnNode("b", "pod b running")


def test_agent_on_node_names_a_pod_that_is_not_running() -> None:
    found = agent_on_node([pod("a", "n", ready=False)], {}, HOME)
    assert found.running_pod is None
    assert found.found == "pod a is Running, not ready"
    assert found.fix == f"kubectl -n {HOME} describe pod a"


def test_agent_on_node_without_a_pod_says_what_the_daemonset_selects() -> None:
    found = agent_on_node([], {"pool": "ssd"}, HOME)
    assert found.running_pod is None
    assert "the DaemonSet selects pool=ssd" in found.found
    assert "every node" in agent_on_node([], {}, HOME).found


def warmth(*records: tuple[str, WarmState, str]) -> NodeWarmth:
    return NodeWarmth(
        {
            BentoRef("models", name, "v1"): WarmRecord(
                BentoRef("models", name, "v1"),
                state,
                message=message,
            )
            for name, state, message in records
        }
    )


def test_failed_warms_names_each_failed_bento_and_why() -> None:
    record = warmth(("ok", "warm", ""), ("bad", "failed", "no space"), ("mute", "failed", ""))
    assert failed_warms(record) == ["bad:v1 (no space)", "mute:v1"]
    assert failed_warms(NodeWarmth()) == []


def test_node_agent_row_warns_for_a_failed_warm_but_never_hides_a_fail() -> None:
    annotated = node("n1", annotations={WARM_ANNOTATION: warmth(("bad", "failed", "")).render()})
    running = node_agent_row(annotated, AgentOnNode("agent-1", "pod agent-1 running"), HOME)
    assert running.verdict == "warn"
    assert "failed: bad:v1" in running.found
    assert f"kubectl -n {HOME} logs agent-1" in running.fix
    missing = node_agent_row(annotated, AgentOnNode(None, "no agent pod", "fix it"), HOME)
    assert (missing.verdict, missing.fix) == ("FAIL", "fix it")


def test_node_agent_row_warns_on_an_unreadable_record() -> None:
    garbled = node("n1", annotations={WARM_ANNOTATION: "{not json"})
    row = node_agent_row(garbled, AgentOnNode("agent-1", "pod agent-1 running"), HOME)
    assert row.verdict == "warn"
    assert "unreadable" in row.found


# -- where the webhook is served


def test_webhook_service_fills_in_the_configs_defaults() -> None:
    assert webhook_service({}, CONFIG) == WebhookService(
        CONFIG.webhook.namespace, CONFIG.webhook.service_name, 443
    )
    named = webhook_service({"service": {"namespace": "x", "name": "y", "port": 8443}}, CONFIG)
    assert (str(named), named.port) == ("x/y", 8443)


def test_service_port_name_finds_the_port_or_says_it_cannot() -> None:
    service = {"spec": {"ports": [{"port": 443, "name": "https"}, {"port": 80}]}}
    assert service_port_name(service, 443) == "https"
    assert service_port_name(service, 80) == ""
    assert service_port_name(service, 8443) is None
    assert service_port_name(Unreadable("403 Forbidden"), 443) is None


def test_ready_addresses_skip_unready_endpoints_and_other_ports() -> None:
    slices = [
        {
            "ports": [{"name": "metrics", "port": 9090}, {"name": "https", "port": 9443}],
            "endpoints": [
                {"addresses": ["10.0.0.2"], "conditions": {"ready": True}},
                {"addresses": ["10.0.0.1"]},  # unknown readiness counts as ready
                {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},
            ],
        },
        {"ports": [{"name": "https", "port": 9443}], "endpoints": [{"addresses": ["10.0.0.1"]}]},
    ]
    assert ready_addresses(slices, "https") == [("10.0.0.1", 9443), ("10.0.0.2", 9443)]
    assert ready_addresses(slices, None) == [
        ("10.0.0.1", 9090),
        ("10.0.0.1", 9443),
        ("10.0.0.2", 9090),
    ]


# -- the caBundle


def test_bundle_problems_names_each_unusable_bundle() -> None:
    now = dt.datetime.now(dt.UTC)
    ca_pem, _ = generate_ca()
    problems, certs = bundle_problems(
        [("good", ca_pem), ("not-b64", None), ("empty", b""), ("junk", b"junk")], now
    )
    assert problems == [
        "webhook not-b64: the caBundle is not base64",
        "webhook empty: the caBundle is empty",
        "webhook junk: the caBundle holds no PEM certificate",
    ]
    assert [len(certs[hook]) for hook in ("good", "not-b64", "empty", "junk")] == [1, 0, 0, 0]


def test_bundle_problems_finds_a_bundle_of_expired_certificates() -> None:
    ca_pem, _ = generate_ca()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3651)
    problems, _ = bundle_problems([("old", ca_pem)], later)
    assert problems == ["webhook old: every certificate in the caBundle has expired"]
