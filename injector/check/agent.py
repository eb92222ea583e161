"""The node agent on each SSD node: its DaemonSet's pod there, and the node's warm-models record.

The agent mounts for every Bento pod on its node, in either cache mode, so
a node without it starts none (FAIL). Its record (`common.warm`) says which
Bentos are warm there; a failed warm is a warning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.warm import WARM_ANNOTATION, WARM_STATES, NodeWarmth
from injector.check.nodes import has_label
from injector.check.rows import CheckId, Row, Verdict, listed, unreadable
from injector.check.state import Obj, Unreadable, dig, labels_of, name_of
from injector.config import InjectorConfig, NodeLabel

# The shipped node agent (manifests/base/node-agent.yaml); not a config key.
NODE_AGENT = "bento-juicefs-node-agent"


@dataclass(frozen=True)
class AgentOnNode:
    """What the agent's pods on one node say: the one running (if any), what was found, the fix."""

    running_pod: str | None
    found: str
    fix: str = ""


def _pod_state(pod: Obj) -> tuple[bool, str]:
    """(running and ready, how it is) for one pod."""
    phase = str(dig(pod, "status", "phase") or "Unknown")
    if dig(pod, "metadata", "deletionTimestamp"):
        return False, "terminating"
    statuses = dig(pod, "status", "containerStatuses") or []
    for status in statuses:
        waiting = dig(status, "state", "waiting")
        if waiting:
            return False, f"{phase}, {status.get('name')} waiting: {waiting.get('reason')}"
    ready = bool(statuses) and all(s.get("ready") for s in statuses)
    if phase == "Running" and ready:
        return True, "running"
    return False, phase + ("" if ready else ", not ready")


def _record_summary(node: Obj) -> tuple[NodeWarmth | None, str]:
    text = (dig(node, "metadata", "annotations") or {}).get(WARM_ANNOTATION)
    if not text:
        return NodeWarmth(), "no warm-models record yet"
    warmth = NodeWarmth.parse(text)
    if not warmth.records and text.strip() != "[]":
        return None, f"its {WARM_ANNOTATION} annotation is unreadable"
    counts = dict.fromkeys(WARM_STATES, 0)
    for record in warmth.records.values():
        counts[record.state] += 1
    shown = [f"{counts[s]} {s}" for s in ("warm", "warming", "failed")]
    shown += [
        f"{counts[s]} {s}"
        for s in WARM_STATES
        if s not in ("warm", "warming", "failed") and counts[s]
    ]
    return warmth, "Bentos: " + ", ".join(shown)


def agent_nodes(
    nodes: Sequence[Obj], label: NodeLabel | None, selector: Mapping[str, str]
) -> list[Obj]:
    """The nodes the agent must run on, by name: those with the SSD label.

    Without an SSD label in the config, the nodes the DaemonSet's
    nodeSelector picks (none when it has no selector: nothing to tell them by).
    """
    if label is not None:
        picked = [n for n in nodes if has_label(n, label)]
    else:
        picked = [
            n
            for n in nodes
            if selector and all(labels_of(n).get(k) == v for k, v in selector.items())
        ]
    return sorted(picked, key=name_of)


def agent_pods_by_node(pods: Sequence[Obj], daemonset_uid: str | None) -> dict[str, list[Obj]]:
    """The DaemonSet's pods by the node they are on (owned by its uid, when it has one)."""
    by_node: dict[str, list[Obj]] = {}
    for pod in pods:
        owners = dig(pod, "metadata", "ownerReferences") or []
        if daemonset_uid and not any(o.get("uid") == daemonset_uid for o in owners):
            continue
        by_node.setdefault(str(dig(pod, "spec", "nodeName") or ""), []).append(pod)
    return by_node


def agent_on_node(pods: Sequence[Obj], selector: Mapping[str, str], home: str) -> AgentOnNode:
    """The agent on one node, from its pods there: one running, one that is not, or none."""
    states = [(name_of(p), *_pod_state(p)) for p in pods]
    running = [name for name, is_running, _ in states if is_running]
    if running:
        return AgentOnNode(running[0], f"pod {running[0]} running")
    if states:
        pod_name, _, how = states[0]
        return AgentOnNode(
            None, f"pod {pod_name} is {how}", f"kubectl -n {home} describe pod {pod_name}"
        )
    wanted = ", ".join(f"{k}={v}" for k, v in sorted(selector.items())) or "every node"
    return AgentOnNode(
        None,
        f"no agent pod on this node (the DaemonSet selects {wanted})",
        "make the DaemonSet's nodeSelector and tolerations match this node",
    )


def failed_warms(warmth: NodeWarmth) -> list[str]:
    """The Bentos whose warm failed on the node, as name:version (and why, when recorded)."""
    return [
        f"{r.bento.name}:{r.bento.version}" + (f" ({r.message})" if r.message else "")
        for r in warmth.records.values()
        if r.state == "failed"
    ]


def node_agent_row(node: Obj, agent: AgentOnNode, home: str) -> Row:
    """One SSD node's row: FAIL without a running agent; a warning for its record's troubles."""
    name = name_of(node)
    warmth, record = _record_summary(node)
    verdict: Verdict = "ok" if agent.running_pod else "FAIL"
    found, fix = f"{agent.found}; {record}", agent.fix
    failed = failed_warms(warmth) if warmth is not None else []
    # A record unread or a failed warm is a warning; never one that hides a FAIL.
    if (warmth is None or failed) and verdict == "ok":
        verdict = "warn"
    if failed:
        found += f"; failed: {listed(failed)}"
        fix = fix or (
            f"kubectl describe node {name} (the agent's Events), and "
            f"kubectl -n {home} logs {agent.running_pod or 'AGENT-POD'}"
        )
    return Row("node-agent", f"node {name}", verdict, found, fix)


def check_node_agent(
    nodes: Sequence[Obj] | Unreadable,
    daemonset: Obj | Unreadable | None,
    pods: Sequence[Obj] | Unreadable,
    config: InjectorConfig,
) -> list[Row]:
    """On each SSD node: the agent's pod, and what its record says is warm.

    The agent mounts for every Bento pod on its node, in either cache mode:
    a node without it starts none (FAIL).
    """
    check: CheckId = "node-agent-daemonset"
    home = config.webhook.namespace
    subject = f"DaemonSet {home}/{NODE_AGENT}"
    if isinstance(daemonset, Unreadable):
        return [unreadable(check, subject, "it", daemonset)]
    if daemonset is None:
        return [
            Row(
                check,
                subject,
                "FAIL",
                "not installed: the node agent mounts for every Bento pod, so none starts "
                "(each waits for it, its startup probe says so)",
                "kubectl apply -k manifests/base (docs/node-agent.md)",
            )
        ]
    selector = dict(dig(daemonset, "spec", "template", "spec", "nodeSelector") or {})
    if isinstance(nodes, Unreadable):
        return [unreadable(check, subject, "nodes", nodes)]
    if isinstance(pods, Unreadable):
        return [unreadable(check, subject, "its pods", pods)]
    ssd = agent_nodes(nodes, config.ssd_node_label, selector)
    if not ssd:
        return [Row(check, subject, "ok", "installed; no SSD node to check")]
    by_node = agent_pods_by_node(pods, dig(daemonset, "metadata", "uid"))
    return [
        node_agent_row(node, agent_on_node(by_node.get(name_of(node), []), selector, home), home)
        for node in ssd
    ]
