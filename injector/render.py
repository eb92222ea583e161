"""`render`: run the webhook pipeline offline on YAML, like `istioctl kube-inject`.

A Pod is mutated directly; a workload (Deployment, StatefulSet, Job, ...) has
its pod template mutated and put back. The result is exactly what /mutate
would return, applied.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import jsonpatch
import yaml

from injector.admission import pod_review_request, review
from injector.config import InjectorConfig

# Where each kind keeps the pod template it stamps pods from.
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


class RenderError(Exception):
    pass


@dataclass
class Rendered:
    documents: list[Any]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _describe(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{meta.get('name') or meta.get('generateName') or '<unnamed>'}"


def _render_pod(
    pod: dict[str, Any], namespace: str, config: InjectorConfig, out: Rendered, what: str
) -> dict[str, Any]:
    result = review(pod_review_request(pod, namespace), config)
    if result.outcome == "denied":
        raise RenderError(f"{what}: {result.reason}")
    out.warnings.extend(f"{what}: {w}" for w in result.warnings)
    if result.outcome == "skipped":
        out.notes.append(f"{what}: not injected ({result.reason})")
        return pod
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, result.ops)
    return patched


def render_document(doc: Any, config: InjectorConfig, out: Rendered) -> Any:
    if doc is None:
        return None
    if not isinstance(doc, dict) or "kind" not in doc:
        raise RenderError("a document is not a Kubernetes object (no kind)")
    kind = doc["kind"]
    namespace = (doc.get("metadata") or {}).get("namespace") or "default"
    what = _describe(doc)
    if kind == "List":
        doc = copy.deepcopy(doc)
        doc["items"] = [render_document(item, config, out) for item in doc.get("items") or []]
        return doc
    if kind == "Pod":
        return _render_pod(doc, namespace, config, out, what)
    path = TEMPLATE_PATHS.get(kind)
    if path is None:
        out.notes.append(f"{what}: kind {kind} has no pod template, passed through")
        return doc
    doc = copy.deepcopy(doc)
    parent: Any = doc
    for key in path[:-1]:
        parent = parent.get(key) if isinstance(parent, dict) else None
    template = parent.get(path[-1]) if isinstance(parent, dict) else None
    if not isinstance(template, dict):
        raise RenderError(f"{what}: has no {'.'.join(path)}")
    parent[path[-1]] = _render_pod(template, namespace, config, out, what)
    return doc


def render_text(text: str, config: InjectorConfig) -> Rendered:
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        raise RenderError(f"input is not valid YAML: {err}") from None
    out = Rendered(documents=[])
    out.documents = [
        d for d in (render_document(doc, config, out) for doc in documents) if d is not None
    ]
    if not out.documents:
        raise RenderError("input holds no Kubernetes objects")
    return out


def dump_documents(documents: Iterable[Any]) -> str:
    return yaml.safe_dump_all(list(documents), sort_keys=False, default_flow_style=False)
