"""Which Bentos a node should hold warm: read from the workloads of opted-in namespaces.

A Deployment or StatefulSet counts when its pod template is one the injector
would give a node cache: the decision is the injector's own (`injector.plan.decide`
on the template), so the agent and the webhook never disagree about which
pods are JuiceFS Bentos, which volume they read, or which models they select.
Pure functions over the API's JSON (or what the agent's cache keeps of it,
`slim_workload`); nodeagent.kube does the listing and watching.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common.warm import STARTUP_TAINT, BentoRef
from injector.config import InjectorConfig
from injector.plan import Deny, Skip, decide
from nodeagent.plan import parse_time

# A workload kind and the API group/version its JSON comes from.
KINDS = ("Deployment", "StatefulSet")


@dataclass(frozen=True)
class Workload:
    """One workload whose pods will read a Bento from the node cache."""

    namespace: str
    kind: str
    name: str
    bento: BentoRef
    bento_path: str
    models: tuple[str, ...]
    # When its spec last changed (a new version is a new template): RFC 3339.
    changed_at: str
    # spec.replicas (absent: 1, as the API defaults it).
    replicas: int = 1

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class WantedBento:
    """A Bento the node should hold, and why: the workloads that use it."""

    bento: BentoRef
    bento_path: str
    # The models to hold (empty: all of the Bento's): the union of the workloads'.
    models: tuple[str, ...]
    changed_at: str
    workloads: tuple[str, ...]


def changed_at(obj: Mapping[str, Any]) -> str:
    """The last time anyone but a status writer changed obj (its managedFields), else its creation.

    RFC 3339 UTC timestamps with the same format compare as strings.
    """
    meta = obj.get("metadata") or {}
    times = [
        str(entry["time"])
        for entry in meta.get("managedFields") or []
        if entry.get("time") and entry.get("subresource") != "status"
    ]
    return max(times, default=str(meta.get("creationTimestamp") or ""))


def template_fits_node(template: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """Whether the scheduler may place the template's pods on node (the Node's JSON).

    What it requires, as the scheduler reads it: the nodeSelector, the
    required node affinity (any term; each term's every expression and
    field), and a toleration for each of the node's NoSchedule and NoExecute
    taints but the startup taint, which the agent lifts once it has warmed what
    the pods that do not tolerate it need. Preferences are not weighed: a node
    the pods may land on is one worth warming.
    """
    spec = template.get("spec") or {}
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    selector = spec.get("nodeSelector") or {}
    if not all(labels.get(key) == value for key, value in selector.items()):
        return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms") or []
    fields = {"metadata.name": str(meta.get("name") or "")}
    if terms and not any(_term_matches(term, labels, fields) for term in terms):
        return False
    taints = (node.get("spec") or {}).get("taints") or []
    tolerations = spec.get("tolerations") or []
    return all(
        taint.get("effect") == "PreferNoSchedule"
        or taint.get("key") == STARTUP_TAINT
        or any(_tolerates(toleration, taint) for toleration in tolerations)
        for taint in taints
    )


def _term_matches(
    term: Mapping[str, Any], labels: Mapping[str, str], fields: Mapping[str, str]
) -> bool:
    expressions = term.get("matchExpressions") or []
    by_field = term.get("matchFields") or []
    if not expressions and not by_field:
        return False  # an empty term matches no node
    return all(_expression_matches(e, labels) for e in expressions) and all(
        _expression_matches(e, fields) for e in by_field
    )


def _expression_matches(expression: Mapping[str, Any], values: Mapping[str, str]) -> bool:
    key, operator = expression.get("key"), expression.get("operator")
    wanted = [str(v) for v in expression.get("values") or []]
    present = key in values
    value = values.get(str(key), "")
    if operator == "In":
        return present and value in wanted
    if operator == "NotIn":
        return not present or value not in wanted
    if operator == "Exists":
        return present
    if operator == "DoesNotExist":
        return not present
    if operator in ("Gt", "Lt") and present and len(wanted) == 1:
        try:
            number, bound = int(value), int(wanted[0])
        except ValueError:
            return False
        return number > bound if operator == "Gt" else number < bound
    return False


def _tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    effect = toleration.get("effect")
    if effect and effect != taint.get("effect"):
        return False
    if toleration.get("operator") == "Exists":
        return not toleration.get("key") or toleration.get("key") == taint.get("key")
    return toleration.get("key") == taint.get("key") and (toleration.get("value") or "") == (
        taint.get("value") or ""
    )


def workload_bento(obj: Mapping[str, Any], kind: str, config: InjectorConfig) -> Workload | str:
    """The workload's Bento if its pods would use the node cache, else why not (for the log)."""
    meta = obj.get("metadata") or {}
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    template = (obj.get("spec") or {}).get("template") or {}
    pod = {"metadata": template.get("metadata") or {}, "spec": template.get("spec") or {}}
    decision = decide(pod, namespace, config)
    if isinstance(decision, Skip):
        return f"{kind} {namespace}/{name}: {decision.reason}"
    if isinstance(decision, Deny):
        return f"{kind} {namespace}/{name}: its pods would be denied: {decision.message}"
    if decision.cache_mode != "node":
        return f"{kind} {namespace}/{name}: its pods use a pod cache"
    return Workload(
        namespace=namespace,
        kind=kind,
        name=name,
        bento=BentoRef(decision.volume, decision.bento_name, decision.bento_version),
        bento_path=decision.juicefs_path,
        models=decision.models,
        changed_at=changed_at(obj),
        replicas=replicas(obj),
    )


def slim_workload(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What the agent keeps of a Deployment or StatefulSet in its cache, in the object's own
    shape: what workload_bento, template_fits_node and serving read of it, and no more.

    A Deployment's JSON is several KiB (containers, probes, env, managed
    fields, status); this keeps the template's labels and annotations (the
    injector's decision), its placement (nodeSelector, required node
    affinity, tolerations), spec.replicas, the generation (the watch's
    "spec changed" rule) and of managedFields only the time changed_at
    would read.
    """
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    template = spec.get("template") or {}
    template_meta = template.get("metadata") or {}
    template_spec = template.get("spec") or {}
    kept_meta = {k: meta[k] for k in ("namespace", "name", "generation") if k in meta}
    # changed_at falls back to the creation time only without managedFields; kept as one.
    kept_meta["managedFields"] = [{"time": changed_at(obj)}]
    required = ((template_spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    placement: dict[str, Any] = {
        k: template_spec[k] for k in ("nodeSelector", "tolerations") if template_spec.get(k)
    }
    if required:
        placement["affinity"] = {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}
        }
    labels = {k: template_meta[k] for k in ("labels", "annotations") if k in template_meta}
    kept_spec: dict[str, Any] = {"template": {"metadata": labels, "spec": placement}}
    if "replicas" in spec:
        kept_spec["replicas"] = spec["replicas"]
    return {"metadata": kept_meta, "spec": kept_spec}


def generation(obj: Mapping[str, Any]) -> int | None:
    value = (obj.get("metadata") or {}).get("generation")
    return value if isinstance(value, int) else None


def node_workloads(
    workloads: Iterable[tuple[str, Mapping[str, Any]]],
    chosen: Collection[str],
    config: InjectorConfig,
    node: Mapping[str, Any],
) -> tuple[list[Workload], list[str]]:
    """The node-cache Bento workloads among (kind, object) pairs in the chosen (opted-in)
    namespaces whose pods may run on node; and why each other Bento-looking one was not."""
    found: list[Workload] = []
    ignored: list[str] = []
    for kind, obj in workloads:
        if str((obj.get("metadata") or {}).get("namespace") or "") not in chosen:
            continue
        template = (obj.get("spec") or {}).get("template") or {}
        if not template_fits_node(template, node):
            continue
        result = workload_bento(obj, kind, config)
        if isinstance(result, Workload):
            found.append(result)
        else:
            ignored.append(result)
    return found, ignored


def replicas(obj: Mapping[str, Any]) -> int:
    value = (obj.get("spec") or {}).get("replicas")
    return value if isinstance(value, int) and not isinstance(value, bool) else 1


def serving(
    workloads: Iterable[Workload], now: dt.datetime, grace_seconds: float
) -> list[Workload]:
    """The workloads whose Bentos a node should hold: those with pods, or scaled to zero
    within grace_seconds (a scale-to-zero service coming back finds its node warm).

    A Deployment left at `replicas: 0` would otherwise hold every SSD node's
    budget and cost store egress for pods that never come.
    """

    def recent(workload: Workload) -> bool:
        since = parse_time(workload.changed_at)
        return since is None or (now - since).total_seconds() < grace_seconds

    return [w for w in workloads if w.replicas > 0 or recent(w)]


def _union(selections: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    chosen: set[str] = set()
    for models in selections:
        if not models:
            return ()  # one workload wants every model of the Bento
        chosen.update(models)
    return tuple(sorted(chosen))


def wanted_bentos(workloads: Iterable[Workload]) -> list[WantedBento]:
    """One entry per Bento, newest change first (ties: by name), as the agent warms them."""
    by_bento: dict[BentoRef, list[Workload]] = {}
    for workload in workloads:
        by_bento.setdefault(workload.bento, []).append(workload)
    wanted = [
        WantedBento(
            bento=bento,
            bento_path=users[0].bento_path,
            models=_union(w.models for w in users),
            changed_at=max(w.changed_at for w in users),
            workloads=tuple(sorted(str(w) for w in users)),
        )
        for bento, users in by_bento.items()
    ]
    wanted.sort(key=lambda w: w.bento)
    wanted.sort(key=lambda w: w.changed_at, reverse=True)
    return wanted


def recorded_bento(bento: BentoRef, models: tuple[str, ...], config: InjectorConfig) -> WantedBento:
    """A Bento the node holds but no workload wants (to evict it): where it is in the volume."""
    path = config.models.juicefs_path_template.format(name=bento.name, version=bento.version)
    return WantedBento(bento=bento, bento_path=path, models=models, changed_at="", workloads=())
