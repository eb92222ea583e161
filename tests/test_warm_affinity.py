"""The preferred node affinity to nodes where the pod's Bento is warm (common.warm)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from common.warm import (
    WARM_LABEL_PREFIX,
    BentoRef,
    NodeWarmth,
    WarmRecord,
    is_warm_label,
    warm_label_key,
)
from injector.config import ConfigError, InjectorConfig, parse_config
from tests.helpers import bento_pod, inject, run

STATUS = "juicefs.bentoml.com/status"
KEY = "warm.juicefs.bentoml.com/llama3-service.v1"
TERM = {
    "weight": 75,
    "preference": {"matchExpressions": [{"key": KEY, "operator": "In", "values": ["models"]}]},
}


def with_annotations(pod: dict[str, Any], **annotations: str) -> dict[str, Any]:
    pod["metadata"]["annotations"] = {f"juicefs.bentoml.com/{k}": v for k, v in annotations.items()}
    return pod


def preferred(pod: dict[str, Any]) -> list[dict[str, Any]]:
    node = pod["spec"].get("affinity", {}).get("nodeAffinity", {})
    return list(node.get("preferredDuringSchedulingIgnoredDuringExecution") or [])


def warm_terms(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        term
        for term in preferred(pod)
        if any(is_warm_label(e["key"]) for e in term["preference"]["matchExpressions"])
    ]


def status_affinity(pod: dict[str, Any]) -> dict[str, str]:
    affinity: dict[str, str] = json.loads(pod["metadata"]["annotations"][STATUS])["affinity"]
    return affinity


def test_a_pod_on_the_node_cache_prefers_nodes_where_its_bento_is_warm() -> None:
    assert InjectorConfig().cache_mode == "node"
    out = inject(bento_pod())
    assert warm_terms(out) == [TERM]
    # After the profile's image-streaming term, which keeps its place.
    assert preferred(out)[-1] == TERM
    assert status_affinity(out)[f"{KEY}=models"] == "preferred"


def test_the_term_names_the_pods_volume() -> None:
    config = parse_config({"juicefs": {"allowedVolumes": ["models", "vision"]}})
    out = inject(with_annotations(bento_pod(), volume="vision"), config)
    [term] = warm_terms(out)
    assert term["preference"]["matchExpressions"] == [
        {"key": KEY, "operator": "In", "values": ["vision"]}
    ]
    assert status_affinity(out)[f"{KEY}=vision"] == "preferred"


def test_a_pod_on_its_own_cache_gets_no_warm_term() -> None:
    out = inject(with_annotations(bento_pod(), **{"cache-mode": "pod"}))
    assert warm_terms(out) == []
    assert not any(is_warm_label(label) for label in status_affinity(out))


def test_pods_default_to_their_own_cache_without_a_node_cache_and_get_no_warm_term() -> None:
    config = parse_config(
        {"cluster": {"platformProfile": "none"}, "scheduling": {"ssdPolicy": "off"}}
    )
    out = inject(bento_pod(), config)
    assert warm_terms(out) == []
    assert status_affinity(out) == {}


def test_prefer_warm_nodes_false_adds_nothing() -> None:
    config = parse_config({"scheduling": {"preferWarmNodes": False}})
    out = inject(bento_pod(), config)
    assert warm_terms(out) == []
    assert not any(is_warm_label(label) for label in status_affinity(out))


def test_the_weight_is_configurable_within_1_to_100() -> None:
    config = parse_config({"scheduling": {"warmNodeWeight": 30}})
    [term] = warm_terms(inject(bento_pod(), config))
    assert term["weight"] == 30
    for bad in (0, 101):
        with pytest.raises(ConfigError, match=r"scheduling\.warmNodeWeight"):
            parse_config({"scheduling": {"warmNodeWeight": bad}})


def test_the_defaults() -> None:
    scheduling = InjectorConfig().scheduling
    assert scheduling.prefer_warm_nodes is True
    assert scheduling.warm_node_weight == 75
    # Between the image-streaming term and the preferred SSD term.
    streaming = InjectorConfig().cluster.profile.streaming_weight
    assert streaming < scheduling.warm_node_weight < scheduling.preferred_weight


def test_the_same_term_already_in_the_pod_is_kept_as_written_not_duplicated() -> None:
    own = {**TERM, "weight": 10}
    pod = bento_pod(
        affinity={"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [own]}}
    )
    result = run(pod)
    assert KEY not in json.dumps([op for op in result.ops if op["path"].startswith("/spec")])
    out = inject(pod)
    assert warm_terms(out) == [own]
    assert status_affinity(out)[f"{KEY}=models"] == "preferred"


def test_a_term_on_the_same_key_for_another_volume_gets_ours_beside_it() -> None:
    other = {
        "weight": 10,
        "preference": {"matchExpressions": [{"key": KEY, "operator": "In", "values": ["old"]}]},
    }
    pod = bento_pod(
        affinity={"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [other]}}
    )
    assert warm_terms(inject(pod)) == [other, TERM]


def test_a_long_bento_identity_gets_the_digest_key_the_node_agent_uses() -> None:
    version = "v" + "0123456789" * 10
    pod = bento_pod()
    pod["metadata"]["labels"]["yatai.ai/bento-version"] = version
    [term] = warm_terms(inject(pod))
    [expression] = term["preference"]["matchExpressions"]
    key = warm_label_key("llama3-service", version)
    assert expression == {"key": key, "operator": "In", "values": ["models"]}
    name = key.removeprefix(WARM_LABEL_PREFIX)
    assert name != f"llama3-service.{version}"
    assert len(name) <= 63
    assert name.startswith("llama3-service.v0123")


def test_the_term_matches_the_labels_the_node_agent_sets_and_only_those() -> None:
    """The injector's expression against the labels `common.warm` gives a node."""
    [term] = warm_terms(inject(bento_pod()))
    [expression] = term["preference"]["matchExpressions"]

    def matches(labels: dict[str, str]) -> bool:
        return labels.get(expression["key"]) in expression["values"]

    def node(*records: WarmRecord) -> dict[str, str]:
        return NodeWarmth({r.bento: r for r in records}).labels()

    ours = BentoRef("models", "llama3-service", "v1")
    assert matches(node(WarmRecord(ours, "warm", verified=True)))
    assert not matches(node(WarmRecord(ours, "warm", verified=False)))
    assert not matches(node(WarmRecord(ours, "warming")))
    assert not matches(
        node(WarmRecord(BentoRef("models", "llama3-service", "v2"), "warm", verified=True))
    )
    assert not matches(
        node(WarmRecord(BentoRef("vision", "llama3-service", "v1"), "warm", verified=True))
    )


def test_a_second_pass_changes_nothing() -> None:
    for pod in (bento_pod(), with_annotations(bento_pod(), **{"ssd-policy": "preferred"})):
        out = inject(pod)
        again = run(out)
        assert again.ops == [], again.ops
        assert len(warm_terms(out)) == 1


def test_order_with_a_preferred_ssd_term() -> None:
    out = inject(with_annotations(bento_pod(), **{"ssd-policy": "preferred"}))
    keys = [p["preference"]["matchExpressions"][0]["key"] for p in preferred(out)]
    assert keys == [
        "cloud.google.com/gke-ephemeral-storage-local-ssd",
        "cloud.google.com/gke-image-streaming",
        KEY,
    ]
    weights = [p["weight"] for p in preferred(out)]
    assert weights == [100, 50, 75]
