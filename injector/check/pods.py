"""The Bento pods already running in the opted-in namespaces: injected, current, and let in.

Three things the control-plane checks cannot see, each a warning (the pods
run, but not as the config means them to):

- a pod the webhook selects (`injector.plan.is_selected`, and not opted
  out) without the injector's status annotation: created before its
  namespace opted in, or while the webhook was down with failurePolicy
  Ignore;
- an injected pod whose sidecar runs another image than `sidecar.image`:
  injected before an upgrade, its workload not restarted since;
- a pod whose readiness gate (`readiness.conditionType`) has been False for
  longer than `STUCK_AFTER`: traffic never reaches it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

from injector.check.rows import CheckId, Row, listed, plural, unreadable
from injector.check.state import Obj, Unreadable, dig, labels_of, name_of
from injector.config import InjectorConfig
from injector.plan import is_selected

# How long a readiness gate may stay closed before it is a warning: longer
# than a large model's first warm from the object store.
STUCK_AFTER = dt.timedelta(minutes=15)

NOT_INJECTED: CheckId = "pod-not-injected"
IMAGE_SKEW: CheckId = "sidecar-image-skew"
GATE_STUCK: CheckId = "readiness-gate-stuck"

PodsByNamespace = Mapping[str, Sequence[Obj] | Unreadable]


def _qualified(pod: Obj) -> str:
    return f"{dig(pod, 'metadata', 'namespace') or ''}/{name_of(pod)}"


def is_injected(pod: Obj, config: InjectorConfig) -> bool:
    return config.annotations.status in (dig(pod, "metadata", "annotations") or {})


def wants_injection(pod: Obj, config: InjectorConfig) -> bool:
    """Selected by the webhook's rule, and not opted out with the inject=false label."""
    return is_selected(pod, config) and labels_of(pod).get(config.labels.inject) != "false"


def sidecar_image(pod: Obj, config: InjectorConfig) -> str | None:
    """The image of the injected sidecar (native: an init container; classic: a container)."""
    spec = pod.get("spec") or {}
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        if container.get("name") == config.sidecar.container_name:
            return str(container.get("image") or "")
    return None


def closed_gate(
    pod: Obj, config: InjectorConfig, now: dt.datetime
) -> tuple[dt.timedelta, str, str] | None:
    """(how long, reason, message) when the pod's readiness gate has been False too long."""
    for condition in dig(pod, "status", "conditions") or []:
        if condition.get("type") != config.readiness.condition_type:
            continue
        if condition.get("status") != "False":
            return None
        try:
            since = dt.datetime.fromisoformat(str(condition.get("lastTransitionTime")))
        except ValueError:
            return None
        if since.tzinfo is None:  # the API writes UTC ("Z"); a bare time is taken as UTC
            since = since.replace(tzinfo=dt.UTC)
        closed_for = now - since
        if closed_for <= STUCK_AFTER:
            return None
        return closed_for, str(condition.get("reason") or ""), str(condition.get("message") or "")
    return None


def check_not_injected(pods: PodsByNamespace, config: InjectorConfig) -> list[Row]:
    """Per namespace: the pods the webhook would inject that carry no injection."""
    keys = config.labels
    selector = f"{keys.model_store}={keys.model_store_value}"
    rows: list[Row] = []
    total = 0
    for namespace, found in sorted(pods.items()):
        subject = f"namespace {namespace}"
        if isinstance(found, Unreadable):
            rows.append(unreadable(NOT_INJECTED, subject, "its pods", found))
            continue
        wanted = [p for p in found if wants_injection(p, config)]
        total += len(wanted)
        missed = sorted(name_of(p) for p in wanted if not is_injected(p, config))
        if missed:
            rows.append(
                Row(
                    NOT_INJECTED,
                    subject,
                    "warn",
                    f"{plural(len(missed), 'pod')} labelled {selector} but not injected "
                    f"(no {config.annotations.status} annotation): {listed(missed)}; "
                    "created before the namespace opted in, or the webhook was down with "
                    "failurePolicy Ignore",
                    f"recreate them so the webhook injects them: kubectl -n {namespace} "
                    "rollout restart the workloads they belong to (or delete the pods)",
                )
            )
    if not rows:
        rows.append(
            Row(
                NOT_INJECTED,
                "Bento pods",
                "ok",
                f"{plural(total, 'pod')} labelled {selector} in the opted-in namespaces, "
                "each injected",
            )
        )
    return rows


def check_image_skew(pods: PodsByNamespace, config: InjectorConfig) -> list[Row]:
    """Injected pods whose sidecar image is not the config's: one row per image found."""
    wanted = config.sidecar.image
    by_image: dict[str, list[str]] = {}
    injected = 0
    for found in pods.values():
        if isinstance(found, Unreadable):
            continue  # the pod-not-injected line says so
        for pod in found:
            image = sidecar_image(pod, config) if is_injected(pod, config) else None
            if image is None:
                continue
            injected += 1
            if image != wanted:
                by_image.setdefault(image, []).append(_qualified(pod))
    if not by_image:
        return [
            Row(
                IMAGE_SKEW,
                "Bento pods",
                "ok",
                f"{plural(injected, 'injected pod')}, each running {wanted}",
            )
        ]
    return [
        Row(
            IMAGE_SKEW,
            f"image {image or '(none)'}",
            "warn",
            f"{plural(len(names), 'pod')} run {config.sidecar.container_name} {image or '(none)'}"
            f", not the config's {wanted}: {listed(sorted(names))} (injected before an "
            "upgrade, their workloads not restarted since)",
            "kubectl -n NAMESPACE rollout restart the workloads they belong to: the webhook "
            "injects the current sidecar",
        )
        for image, names in sorted(by_image.items())
    ]


def check_stuck_gates(pods: PodsByNamespace, config: InjectorConfig, now: dt.datetime) -> list[Row]:
    """Injected pods whose readiness gate has stayed closed for longer than STUCK_AFTER."""
    gate = config.readiness.condition_type
    rows: list[Row] = []
    for found in pods.values():
        if isinstance(found, Unreadable):
            continue
        for pod in sorted(found, key=_qualified):
            closed = closed_gate(pod, config, now) if is_injected(pod, config) else None
            if closed is None:
                continue
            closed_for, reason, message = closed
            minutes = int(closed_for.total_seconds() // 60)
            why = f"{reason}: {message}" if message else reason or "no reason given"
            namespace, name = _qualified(pod).split("/", 1)
            rows.append(
                Row(
                    GATE_STUCK,
                    f"pod {namespace}/{name}",
                    "warn",
                    f"readiness gate {gate} False for {minutes} minutes ({why}): "
                    "the pod gets no traffic",
                    f"kubectl -n {namespace} describe pod {name}; the reason's entry in "
                    "docs/troubleshooting.md (Sidecar condition reasons) says what to do",
                )
            )
    if not rows:
        minutes = int(STUCK_AFTER.total_seconds() // 60)
        rows.append(
            Row(
                GATE_STUCK,
                "Bento pods",
                "ok",
                f"no readiness gate {gate} closed for more than {minutes} minutes",
            )
        )
    return rows
