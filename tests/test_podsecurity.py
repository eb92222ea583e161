"""Pod Security Admission: the injector's own denial, decided by one pure function."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from injector.admission import UserInfo, pod_review_request, review
from injector.config import InjectorConfig, parse_config
from injector.namespaces import NamespaceController
from injector.plan import InjectionPlan, decide
from injector.podsecurity import (
    ENFORCE,
    ENFORCE_VERSION,
    NamespaceSecurity,
    NamespaceSecurityRegistry,
    denial,
    enforcement,
    parse_version,
)
from injector.review_cache import ReviewCache
from tests.helpers import bento_pod

CONFIG = InjectorConfig()
OPT_IN = {"juicefs.bentoml.com/injection": "enabled"}


def plan(
    config: InjectorConfig = CONFIG, annotations: dict[str, str] | None = None
) -> InjectionPlan:
    pod = bento_pod()
    pod["metadata"]["annotations"] = {
        f"juicefs.bentoml.com/{k}": v for k, v in (annotations or {}).items()
    }
    decided = decide(pod, "serving", config)
    assert isinstance(decided, InjectionPlan)
    return decided


@pytest.mark.parametrize(
    ("labels", "level", "version", "source"),
    [
        ({}, "privileged", "latest", "default"),
        ({ENFORCE: "privileged"}, "privileged", "latest", "label"),
        ({ENFORCE: "baseline"}, "baseline", "latest", "label"),
        ({ENFORCE: "restricted", ENFORCE_VERSION: "v1.29"}, "restricted", "v1.29", "label"),
        ({ENFORCE: "baseline", ENFORCE_VERSION: "latest"}, "baseline", "latest", "label"),
        # As the PodSecurity plugin reads them: an unknown level fails closed,
        # an unknown version is the latest.
        ({ENFORCE: "Privileged"}, "restricted", "latest", "invalid label"),
        ({ENFORCE: ""}, "restricted", "latest", "invalid label"),
        ({ENFORCE: "baseline", ENFORCE_VERSION: "1.29"}, "baseline", "latest", "label"),
        ({ENFORCE: "baseline", ENFORCE_VERSION: "v1.029"}, "baseline", "latest", "label"),
        ({ENFORCE_VERSION: "v1.25"}, "privileged", "v1.25", "default"),
    ],
)
def test_enforcement_reads_labels_like_the_plugin(
    labels: dict[str, str], level: str, version: str, source: str
) -> None:
    found = enforcement(NamespaceSecurity.from_labels(labels), CONFIG)
    assert (found.level, found.version, found.source) == (level, version, source)


def test_the_cluster_default_applies_without_the_label() -> None:
    config = parse_config(
        {"podSecurity": {"defaultEnforce": "baseline", "defaultEnforceVersion": "v1.30"}}
    )
    found = enforcement(NamespaceSecurity(), config)
    assert (found.level, found.version, found.source) == ("baseline", "v1.30", "default")
    # The namespace's own label wins over the default.
    assert enforcement(NamespaceSecurity("privileged"), config).level == "privileged"


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("latest", "latest"),
        ("v1.0", "v1.0"),
        ("v1.30", "v1.30"),
        ("v2.1", "latest"),
        ("", "latest"),
    ],
)
def test_parse_version(value: str, parsed: str) -> None:
    assert parse_version(value) == parsed


@pytest.mark.parametrize("level", ["baseline", "restricted"])
@pytest.mark.parametrize("version", [None, "latest", "v1.0", "v1.23", "v1.37"])
def test_baseline_and_restricted_deny_at_every_version(level: str, version: str | None) -> None:
    message = denial("team-a", NamespaceSecurity(level, version), plan(), CONFIG)
    assert message is not None
    assert f"namespace team-a enforces Pod Security level {level}:{version or 'latest'}" in message


def test_privileged_and_unknown_namespaces_are_not_judged() -> None:
    assert denial("team-a", NamespaceSecurity("privileged"), plan(), CONFIG) is None
    assert denial("team-a", NamespaceSecurity(), plan(), CONFIG) is None  # default privileged
    # Not seen by the namespace controller (yet): Pod Security has the last word.
    assert denial("team-a", None, plan(), CONFIG) is None


def test_the_message_explains_the_sidecar_and_what_to_do() -> None:
    message = denial("team-a", NamespaceSecurity("baseline"), plan(), CONFIG)
    assert message is not None
    assert f"(label {ENFORCE}=baseline)" in message
    assert "juicefs-mount sidecar" in message
    assert "privileged, as root, to mount the models with FUSE" in message
    assert "hostPath" in message  # the default config's node cache
    assert f"kubectl label namespace team-a {ENFORCE}=privileged --overwrite" in message
    assert "pod-security.kubernetes.io/warn and pod-security.kubernetes.io/audit at baseline" in (
        message
    )
    assert "juicefs.bentoml.com/inject=false" in message
    pod_cache = denial(
        "team-a", NamespaceSecurity("baseline"), plan(CONFIG, {"cache-mode": "pod"}), CONFIG
    )
    assert pod_cache is not None
    assert "hostPath" not in pod_cache


def test_the_message_says_when_the_level_is_not_a_level_or_the_default() -> None:
    invalid = denial("team-a", NamespaceSecurity("Baseline"), plan(), CONFIG)
    assert invalid is not None
    assert "level restricted:latest" in invalid
    assert f"label {ENFORCE}='Baseline' is not a Pod Security level" in invalid
    config = parse_config({"podSecurity": {"defaultEnforce": "restricted"}})
    default = denial("team-a", NamespaceSecurity(), plan(config), config)
    assert default is not None
    assert f"no {ENFORCE} label: the cluster's default level, podSecurity.defaultEnforce" in default


@pytest.mark.parametrize(
    ("config", "username", "runtime_class"),
    [
        ({"enabled": False}, None, None),
        ({"exemptNamespaces": ["team-a"]}, None, None),
        ({"exemptUsernames": ["ci-bot"]}, "ci-bot", None),
        ({"exemptRuntimeClasses": ["kata"]}, None, "kata"),
    ],
)
def test_exemptions_and_the_switch(
    config: dict[str, Any], username: str | None, runtime_class: str | None
) -> None:
    parsed = parse_config({"podSecurity": config})
    state = NamespaceSecurity("restricted")
    found = denial(
        "team-a", state, plan(parsed), parsed, username=username, runtime_class=runtime_class
    )
    assert found is None
    # The same pod without the exemption is denied.
    assert denial("team-a", state, plan(), CONFIG, username="alice", runtime_class="runc")


def test_registry_generation_changes_only_with_what_get_returns() -> None:
    registry = NamespaceSecurityRegistry()
    assert registry.get("a") is None
    registry.observe("a", {ENFORCE: "baseline", "other": "x"})
    first = registry.generation
    registry.observe("a", {ENFORCE: "baseline", "other": "y"})  # not a Pod Security label
    assert registry.generation == first
    registry.observe("a", {ENFORCE: "privileged"})
    assert registry.generation == first + 1
    assert registry.get("a") == NamespaceSecurity("privileged")
    registry.observe("b", {})
    registry.retain(["b"])
    assert registry.get("a") is None
    assert len(registry) == 1
    generation = registry.generation
    registry.forget("nope")
    assert registry.generation == generation


def namespace(name: str, labels: dict[str, str]) -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(name=name, labels=labels, annotations={}))


def test_the_namespace_controller_keeps_opted_in_namespaces_only() -> None:
    registry = NamespaceSecurityRegistry()
    controller = NamespaceController(api=object(), config=CONFIG, security=registry)
    controller.observe("ADDED", namespace("team-a", {**OPT_IN, ENFORCE: "baseline"}))
    controller.observe("ADDED", namespace("team-b", {ENFORCE: "baseline"}))
    controller.observe("ADDED", namespace("bento-juicefs-system", {**OPT_IN, ENFORCE: "baseline"}))
    assert registry.get("team-a") == NamespaceSecurity("baseline")
    assert registry.get("team-b") is None
    assert registry.get("bento-juicefs-system") is None  # never mutated
    controller.observe("MODIFIED", namespace("team-a", {ENFORCE: "baseline"}))  # opted out
    assert registry.get("team-a") is None
    controller.observe("MODIFIED", namespace("team-a", {**OPT_IN}))
    assert registry.get("team-a") == NamespaceSecurity()
    controller.observe("DELETED", namespace("team-a", {**OPT_IN}))
    assert registry.get("team-a") is None


def test_review_denies_for_pod_security_after_the_annotations_and_before_mutating() -> None:
    registry = NamespaceSecurityRegistry()
    registry.observe("locked", {**OPT_IN, ENFORCE: "restricted"})
    result = review(pod_review_request(bento_pod(), "locked"), CONFIG, registry)
    assert result.outcome == "denied"
    assert result.ops == []
    assert result.reason.startswith("JuiceFS model injection: namespace locked enforces")
    # A bad annotation is reported as such first: fixing it alone would not help,
    # but the user sees what they wrote wrong.
    pod = bento_pod()
    pod["metadata"]["annotations"] = {"juicefs.bentoml.com/warmup": "yes"}
    bad = review(pod_review_request(pod, "locked"), CONFIG, registry)
    assert "juicefs.bentoml.com/warmup='yes' is invalid" in bad.reason
    # An opted-out pod is not the injector's business.
    pod = bento_pod()
    pod["metadata"]["labels"]["juicefs.bentoml.com/inject"] = "false"
    assert review(pod_review_request(pod, "locked"), CONFIG, registry).outcome == "skipped"


def test_the_pods_creator_and_runtime_class_reach_the_decision() -> None:
    config = parse_config(
        {"podSecurity": {"exemptUsernames": ["ci-bot"], "exemptRuntimeClasses": ["kata"]}}
    )
    registry = NamespaceSecurityRegistry()
    registry.observe("locked", {**OPT_IN, ENFORCE: "baseline"})
    request = pod_review_request(bento_pod(), "locked")
    as_bot = request.model_copy(update={"user_info": UserInfo(username="ci-bot")})
    assert review(request, config, registry).outcome == "denied"
    assert review(as_bot, config, registry).outcome == "injected"
    kata = pod_review_request(bento_pod(runtimeClassName="kata"), "locked")
    assert review(kata, config, registry).outcome == "injected"


def test_a_cached_answer_is_not_replayed_after_the_level_changed() -> None:
    """A denial, then the namespace labelled privileged: the same pod is now injected."""
    registry = NamespaceSecurityRegistry()
    registry.observe("team-a", {**OPT_IN, ENFORCE: "baseline"})
    cache = ReviewCache(namespaces=registry)
    request = pod_review_request(bento_pod(), "team-a", uid="uid-1")
    body = json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": request.model_dump(by_alias=True, mode="json"),
        }
    ).encode()

    def answer() -> str:
        key, found = cache.get(body, request)
        if found is None:
            found = cache.answer(review(request, CONFIG, registry))
            cache.put(key, found)
        return found.outcome

    assert answer() == "denied"
    assert answer() == "denied"
    assert cache.hits == 1
    registry.observe("team-a", {**OPT_IN, ENFORCE: "privileged"})
    assert answer() == "injected"
