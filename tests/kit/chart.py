"""The Helm chart (charts/bento-juicefs) and the kustomize overlays, rendered.

`helm template` (the pinned Helm) and `kubectl kustomize` (the pinned
kubectl), built or taken from the binaries cache by
devcluster.binaries.ensure_binaries; objects by (kind, name, namespace), and
the normalisation under which the chart's and the overlays' objects compare
equal (tests/test_chart.py says which).
"""

from __future__ import annotations

import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from devcluster.binaries import CHART_COMPONENTS, ensure_binaries

REPO = Path(__file__).resolve().parent.parent.parent
CHART = REPO / "charts" / "bento-juicefs"
OVERLAYS = REPO / "manifests" / "overlays"
CERT_MANAGER = REPO / "manifests" / "components" / "cert-manager"
PROFILES = ("gke", "eks", "aks")
HELM_LABELS = frozenset(
    {
        "helm.sh/chart",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
    }
)
NAMESPACE = "bento-juicefs-system"
# The pod template annotation the chart adds to the Deployment and the
# DaemonSet: the hash of the config, so that a changed config rolls the pods.
CHECKSUM = "checksum/config"
# Objects the chart renders, as (kind, name, namespace) keys.
CONFIG_MAP = ("ConfigMap", "bento-juicefs-injector-config", NAMESPACE)
DEPLOYMENT = ("Deployment", "bento-juicefs-injector", NAMESPACE)
# The annotation of Helm's hooks: the chart's `helm test` objects
# (templates/tests/), which exist only while `helm test` runs and which the
# overlays have no counterpart of (kustomize has no `helm test`).
HOOK = "helm.sh/hook"

Key = tuple[str, str, str]  # (kind, name, namespace)


@cache
def tool_binaries() -> dict[str, Path]:
    return ensure_binaries(CHART_COMPONENTS)


def run_tool(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


def parse_objects(text: str) -> dict[Key, dict[str, Any]]:
    objects: dict[Key, dict[str, Any]] = {}
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        meta = doc["metadata"]
        key = (doc["kind"], meta["name"], meta.get("namespace", ""))
        assert key not in objects, f"rendered twice: {key}"
        objects[key] = doc
    return objects


@cache
def helm_text(*sets: str) -> str:
    args = [str(tool_binaries()["helm"]), "template", "bento-juicefs", str(CHART)]
    for item in sets:
        args += ["--set", item]
    return run_tool(args)


def helm(*sets: str) -> dict[Key, dict[str, Any]]:
    return parse_objects(helm_text(*sets))


def without_hooks(objects: dict[Key, dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """What `helm install` applies: the objects that are no Helm hook."""
    return {
        key: obj
        for key, obj in objects.items()
        if HOOK not in (obj["metadata"].get("annotations") or {})
    }


@cache
def kustomize_text(profile: str) -> str:
    return run_tool([str(tool_binaries()["kubectl"]), "kustomize", str(OVERLAYS / profile)])


def kustomize(profile: str) -> dict[Key, dict[str, Any]]:
    return parse_objects(kustomize_text(profile))


def normalise(obj: dict[str, Any]) -> dict[str, Any]:
    obj = json.loads(json.dumps(obj))  # a deep copy
    labels = obj["metadata"].get("labels")
    if labels is not None:
        for name in HELM_LABELS:
            labels.pop(name, None)
        if not labels:
            del obj["metadata"]["labels"]
    if obj["kind"] == "ConfigMap" and isinstance(obj.get("data", {}).get("config.yaml"), str):
        obj["data"]["config.yaml"] = yaml.safe_load(obj["data"]["config.yaml"])
    template = obj.get("spec", {}).get("template", {}).get("metadata", {})
    annotations = template.get("annotations")
    if annotations is not None:
        annotations.pop(CHECKSUM, None)
        if not annotations:
            del template["annotations"]
    return obj


def dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, indent=1)


def pod_spec(objects: dict[Key, dict[str, Any]], key: Key) -> dict[str, Any]:
    """The pod template's spec of a rendered workload."""
    spec = objects[key]["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec
