"""The nodes the injector's affinity names: the SSD label, and the image-streaming label.

None with the label is FAIL when pods require it (they stay Pending), a
warning when they only prefer it.
"""

from __future__ import annotations

from collections.abc import Sequence

from injector.check.rows import CheckId, Row, Verdict, listed, plural, unreadable
from injector.check.state import Obj, Unreadable, dig, labels_of, name_of
from injector.config import InjectorConfig, NodeLabel


def has_label(node: Obj, label: NodeLabel) -> bool:
    labels = labels_of(node)
    if label.key not in labels:
        return False
    return label.value is None or labels[label.key] == label.value


def node_ready(node: Obj) -> bool:
    """Ready=True and not cordoned: the scheduler may place pods there."""
    if dig(node, "spec", "unschedulable"):
        return False
    conditions = dig(node, "status", "conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _label_command(label: NodeLabel) -> str:
    if label.value is None:  # the affinity asks only that it exists
        return f"kubectl label node NAME {label.key}=ANY-VALUE"
    return f"kubectl label node NAME {label.key}={label.value}"


def _labelled_nodes(
    check: CheckId,
    nodes: Sequence[Obj] | Unreadable,
    label: NodeLabel,
    policy: str,
    heading: str,
    knob: str,
    without: str,
    having: str,
) -> list[Row]:
    """Nodes with a label the injector's affinity names: count, and a verdict by policy.

    What is found follows the heading (the setting that asks for the label)."""
    subject = str(label)
    if isinstance(nodes, Unreadable):
        return [unreadable(check, subject, "nodes", nodes)]
    matched = [n for n in nodes if has_label(n, label)]
    ready = [n for n in matched if node_ready(n)]
    names = sorted(name_of(n) for n in matched)
    if ready:
        note = "" if len(ready) == len(matched) else f" ({len(ready)} Ready and schedulable)"
        found = f"{len(matched)} of {plural(len(nodes), 'node')}{note}: {listed(names)}"
        return [Row(check, subject, "ok", f"{heading}: {found}")]
    verdict: Verdict = "FAIL" if policy == "required" else "warn"
    if matched:
        found = f"{plural(len(matched), 'node')} ({listed(names)}), none Ready and schedulable"
    else:
        found = f"no node of {len(nodes)} has it"
    if policy == "required":
        found += "; pods require it (node affinity), so they stay Pending"
    else:
        found += f"; pods only prefer it, so they run {without}"
    fix = f"label the nodes {having} ({_label_command(label)}), or set {knob}"
    return [Row(check, subject, verdict, f"{heading}: {found}", fix)]


def check_ssd_nodes(nodes: Sequence[Obj] | Unreadable, config: InjectorConfig) -> list[Row]:
    check: CheckId = "ssd-nodes"
    policy = config.scheduling.ssd_policy
    label = config.ssd_node_label
    if policy == "off" or label is None:
        return [
            Row(
                check,
                "cluster",
                "ok",
                "scheduling.ssdPolicy off: pods are not steered to local-SSD nodes",
            )
        ]
    return _labelled_nodes(
        check,
        nodes,
        label,
        policy,
        f"ssdPolicy {policy}",
        "scheduling.ssdNodeLabel to the label they have"
        + (", or scheduling.ssdPolicy: preferred" if policy == "required" else ""),
        "anywhere, and the cache may land on a network disk (a SlowCacheDisk Event says so)",
        "with local SSDs",
    )


def check_streaming_nodes(nodes: Sequence[Obj] | Unreadable, config: InjectorConfig) -> list[Row]:
    check: CheckId = "streaming-nodes"
    name = config.cluster.platform_profile
    profile = config.cluster.profile
    label, affinity = profile.streaming_node_label, profile.streaming_affinity
    what = f"profile {name}" + (f" ({profile.description})" if profile.description else "")
    if label is None or affinity == "off":
        return [Row(check, "cluster", "ok", f"{what}: no image-streaming node label to steer to")]
    return _labelled_nodes(
        check,
        nodes,
        label,
        affinity,
        f"{what}, {affinity}",
        f"cluster.profiles.{name}.streamingAffinity: "
        + ("preferred" if affinity == "required" else "off"),
        "where they land, and their images are pulled in full before they start",
        "that stream images",
    )
