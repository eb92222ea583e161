"""Property tests: for generated pods, the patch is clean, complete and loses nothing."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.warm import is_warm_label, warm_label_key
from injector.config import InjectorConfig
from injector.mutation.owned import owned_names
from tests.helpers import run

CONFIG = InjectorConfig()
# The same properties hold for the classic sidecar (clusters before 1.29).
CLASSIC = InjectorConfig.model_validate({"cluster": {"kubernetesVersion": "1.28"}})
CONFIGS = {"native": CONFIG, "classic": CLASSIC}
OURS_VOLUMES = set(owned_names(CONFIG).volumes)
OUR_EXPRESSIONS = [
    {
        "key": "cloud.google.com/gke-ephemeral-storage-local-ssd",
        "operator": "In",
        "values": ["true"],
    },
    {"key": "cloud.google.com/gke-image-streaming", "operator": "In", "values": ["true"]},
]
GATE = {"conditionType": "juicefs.bentoml.com/models-ready"}
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"

names = st.from_regex(r"[a-z]([a-z0-9-]{0,9}[a-z0-9])?", fullmatch=True).filter(
    lambda n: not n.startswith("juicefs")
)
images = st.sampled_from(
    [
        "nginx",
        "us-docker.pkg.dev/p/r/app:1",
        "quay.io/x/y:2",
        "gcr.io/p/app@sha256:" + "a" * 64,
        "busybox",
    ]
)
expressions = st.fixed_dictionaries(
    {
        "key": st.sampled_from(["zone", "gpu", "pool"]),
        "operator": st.just("In"),
        "values": st.lists(names, min_size=1, max_size=2),
    }
)


@st.composite
def containers(draw: st.DrawFn, min_size: int) -> list[dict[str, Any]]:
    count = draw(st.integers(min_size, 3))
    chosen = draw(st.lists(names, min_size=count, max_size=count, unique=True))
    result = []
    for name in chosen:
        container: dict[str, Any] = {"name": name, "image": draw(images)}
        if draw(st.booleans()):
            container["env"] = [
                {"name": f"E{i}", "value": str(i)} for i in range(draw(st.integers(0, 5)))
            ]
        if draw(st.booleans()):
            container["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
        if draw(st.booleans()):
            container["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
        result.append(container)
    return result


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    labels = {
        "yatai.ai/bento-repository": draw(names),
        "yatai.ai/bento-version": draw(names),
        "app": "x",
    }
    if draw(st.booleans()):
        labels["juicefs.bentoml.com/model-store"] = "juicefs"
    app = draw(containers(1))
    init = draw(containers(0))
    taken = {c["name"] for c in app}
    init = [c for c in init if c["name"] not in taken]
    spec: dict[str, Any] = {"containers": app}
    if init:
        spec["initContainers"] = init
    if draw(st.booleans()):
        spec["volumes"] = [{"name": "data", "emptyDir": {}}]
    if draw(st.booleans()):
        node_affinity: dict[str, Any] = {}
        if draw(st.booleans()):
            terms = draw(
                st.lists(st.lists(expressions, min_size=1, max_size=2), min_size=1, max_size=3)
            )
            node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {
                "nodeSelectorTerms": [{"matchExpressions": t} for t in terms]
            }
        if draw(st.booleans()):
            node_affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [
                {"weight": 10, "preference": {"matchExpressions": [draw(expressions)]}}
            ]
        if draw(st.booleans()):
            # A warm-node term for this Bento, its own (our expression, kept as
            # written) or for another volume (ours is added beside it).
            warm = {
                "key": warm_label_key(
                    labels["yatai.ai/bento-repository"], labels["yatai.ai/bento-version"]
                ),
                "operator": "In",
                "values": [draw(st.sampled_from(["models", "other"]))],
            }
            node_affinity.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append(
                {"weight": draw(st.integers(1, 100)), "preference": {"matchExpressions": [warm]}}
            )
        spec["affinity"] = {"nodeAffinity": node_affinity}
    if draw(st.booleans()):
        spec["readinessGates"] = [{"conditionType": "example.com/other"}]
    for flag in ("hostNetwork", "automountServiceAccountToken"):
        if draw(st.booleans()):
            spec[flag] = draw(st.booleans())
    metadata: dict[str, Any] = {"labels": labels}
    if draw(st.booleans()):
        metadata["name"] = draw(names)
    else:
        metadata["generateName"] = draw(names) + "-"
    if draw(st.booleans()):
        metadata["annotations"] = {"team": draw(names)}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def strip_injection(pod: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """Remove everything DESIGN.md says the injector adds; what is left must be the input."""
    out = copy.deepcopy(pod)
    spec, orig_spec = out["spec"], original["spec"]
    for key in ("initContainers", "containers"):
        if key in spec:
            spec[key] = [c for c in spec[key] if c["name"] != "juicefs-mount"]
            for container in spec[key]:
                mounts = [
                    m for m in container.get("volumeMounts", []) if m["name"] not in OURS_VOLUMES
                ]
                if mounts or "volumeMounts" in _container(orig_spec, key, container["name"]):
                    container["volumeMounts"] = mounts
                else:
                    container.pop("volumeMounts", None)
            if not spec[key] and key not in orig_spec:
                del spec[key]
    for key, ours in (
        ("volumes", lambda v: v["name"] in OURS_VOLUMES),
        ("readinessGates", lambda g: g == GATE),
    ):
        if key in spec:
            spec[key] = [item for item in spec[key] if not ours(item)]
            if not spec[key] and key not in orig_spec:
                del spec[key]
    node = spec.get("affinity", {}).get("nodeAffinity", {})
    required = node.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required:
        for term in required["nodeSelectorTerms"]:
            term["matchExpressions"] = [
                e for e in term.get("matchExpressions", []) if e not in OUR_EXPRESSIONS
            ]
        required["nodeSelectorTerms"] = [
            t for t in required["nodeSelectorTerms"] if t["matchExpressions"]
        ]
        if not required["nodeSelectorTerms"]:
            del node["requiredDuringSchedulingIgnoredDuringExecution"]
    if "preferredDuringSchedulingIgnoredDuringExecution" in node:
        orig_preferred = (
            orig_spec.get("affinity", {})
            .get("nodeAffinity", {})
            .get("preferredDuringSchedulingIgnoredDuringExecution", [])
        )
        node["preferredDuringSchedulingIgnoredDuringExecution"] = [
            p
            for p in node["preferredDuringSchedulingIgnoredDuringExecution"]
            if p["preference"]["matchExpressions"][0] not in OUR_EXPRESSIONS
            and not (_is_warm_term(p) and p not in orig_preferred)
        ]
        if not node["preferredDuringSchedulingIgnoredDuringExecution"]:
            del node["preferredDuringSchedulingIgnoredDuringExecution"]
    if "affinity" in spec and "affinity" not in orig_spec:
        del spec["affinity"]
    annotations = out["metadata"].get("annotations", {})
    annotations.pop("juicefs.bentoml.com/status", None)
    # A classic sidecar goes first in containers: kubectl is pointed at the app.
    if DEFAULT_CONTAINER not in original["metadata"].get("annotations", {}):
        annotations.pop(DEFAULT_CONTAINER, None)
    if not annotations and "annotations" not in original["metadata"]:
        out["metadata"].pop("annotations", None)
    return out


def _is_warm_term(term: dict[str, Any]) -> bool:
    return any(is_warm_label(e["key"]) for e in term["preference"]["matchExpressions"])


def _container(spec: dict[str, Any], key: str, name: str) -> dict[str, Any]:
    return next((c for c in spec.get(key, []) if c["name"] == name), {})


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pods())
def test_patch_applies_cleanly_and_loses_nothing(
    config: InjectorConfig, pod: dict[str, Any]
) -> None:
    original = copy.deepcopy(pod)
    result = run(pod, config)
    assert pod == original, "the webhook must not mutate its input"
    selected = pod["metadata"]["labels"].get("juicefs.bentoml.com/model-store") == "juicefs"
    if not selected:
        assert result.outcome == "skipped"
        assert result.ops == []
        return
    assert result.outcome == "injected"
    patched = jsonpatch.apply_patch(pod, result.ops)
    sidecars = [
        c
        for key in ("initContainers", "containers")
        for c in patched["spec"].get(key, [])
        if c["name"] == "juicefs-mount"
    ]
    assert len(sidecars) == 1
    for container in patched["spec"]["containers"]:
        if container["name"] != "juicefs-mount":
            assert any(m["name"] == "juicefs-mount-dir" for m in container["volumeMounts"])
    assert GATE in patched["spec"]["readinessGates"]
    # The default config puts every pod on the node cache: exactly one term
    # prefers nodes where its Bento is warm in its volume, whoever wrote it.
    warm = {
        "key": warm_label_key(
            pod["metadata"]["labels"]["yatai.ai/bento-repository"],
            pod["metadata"]["labels"]["yatai.ai/bento-version"],
        ),
        "operator": "In",
        "values": ["models"],
    }
    node = patched["spec"]["affinity"]["nodeAffinity"]
    terms = node["preferredDuringSchedulingIgnoredDuringExecution"]
    assert [t["preference"]["matchExpressions"] for t in terms].count([warm]) == 1
    assert strip_injection(patched, original) == original
    # No host path and no credential in the pod; nothing but the sidecar
    # mounts the agent volume.
    assert not any("hostPath" in v for v in patched["spec"].get("volumes", []))
    assert sidecars[0]["securityContext"]["runAsNonRoot"] is True
    assert not any(
        m["name"] == owned_names(config).agent_volume
        for key in ("initContainers", "containers")
        for c in patched["spec"].get(key, [])
        if c["name"] != "juicefs-mount"
        for m in c.get("volumeMounts", [])
    )
    again = run(patched, config)
    assert again.ops == []
