"""Fuzzing with the normal test run's budget: every target of tests/fuzzing.py, a little.

`make fuzz` runs the same targets on 100,000+ inputs (bench-results/fuzz.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from injector.admission import pod_review_request, review
from injector.podshape import metadata_problems, spec_problems
from tests import fuzzing
from tests.helpers import bento_pod

BUDGET = 150


@pytest.mark.parametrize("target", fuzzing.TARGETS, ids=lambda t: t.name)
def test_target(target: fuzzing.Target) -> None:
    seen = fuzzing.Seen()
    fuzzing.run_target(target, BUDGET, seen)
    assert seen.total() >= BUDGET


def test_http_mutate_never_answers_5xx(tmp_path: Path) -> None:
    seen = fuzzing.Seen()
    fuzzing.run_http(BUDGET, tmp_path, seen)
    outcomes = seen.counts["http_mutate"]
    assert sum(outcomes.values()) >= BUDGET
    assert not any(o.startswith("5") for o in outcomes)


def test_the_fuzz_script_counts_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    args = ["--examples", "20", "--http-examples", "20", "--atheris-runs", "0"]
    assert fuzzing.main([*args, "--jobs", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["failures"] == 0
    assert set(report["targets"]) == {t.name for t in fuzzing.TARGETS} | {"http_mutate"}
    assert report["inputs"] == sum(t["inputs"] for t in report["targets"].values())
    assert report["inputs"] >= 20 * (len(fuzzing.TARGETS) + 1)


# What the fuzzers found, kept as plain cases.


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda p: p.update(metadata=5), "metadata is a number: expected an object"),
        (
            lambda p: p["metadata"]["labels"].update({"app": 1}),
            "metadata.labels is an object: expected an object of string values",
        ),
        (lambda p: p["metadata"].update(namespace=["x"]), "metadata.namespace is a list"),
        (lambda p: p["spec"].update(containers="main"), "spec.containers is a string"),
        (lambda p: p["spec"].update(containers=[None]), "spec.containers[0] is missing"),
        (
            lambda p: p["spec"]["containers"][0].update(volumeMounts=[{"mountPath": "/x"}]),
            "spec.containers[0].volumeMounts[0].name is missing: expected a string",
        ),
        (
            lambda p: p["spec"].update(volumes=[{"name": "v", "hostPath": "/"}]),
            "spec.volumes[0].hostPath is a string: expected an object",
        ),
        (
            lambda p: p["spec"].update(
                affinity={"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [7]}}
            ),
            "preferredDuringSchedulingIgnoredDuringExecution[0] is a number",
        ),
        (lambda p: p["spec"].update(readinessGates={"a": 1}), "spec.readinessGates is an object"),
    ],
)
def test_a_malformed_pod_is_denied_naming_the_field(change: Any, field: str) -> None:
    pod = bento_pod()
    change(pod)
    result = review(pod_review_request(pod, "serving"), fuzzing.DEFAULT)
    assert result.outcome == "denied"
    assert "the pod is not a well-formed Kubernetes Pod" in result.reason
    assert field in result.reason


def test_a_well_formed_pod_has_no_shape_problems() -> None:
    for pod in fuzzing.SEED_PODS:
        assert metadata_problems(pod) == []
        assert spec_problems(pod) == []


def test_nulls_are_absent_except_as_list_items() -> None:
    pod = bento_pod(volumes=None, affinity=None)
    pod["metadata"]["annotations"] = None
    assert metadata_problems(pod) == spec_problems(pod) == []
    assert fuzzing.check_result(pod, "serving", fuzzing.DEFAULT) == "injected"


def test_a_forged_status_that_is_not_ours_is_denied() -> None:
    pod = bento_pod()
    pod["metadata"]["annotations"] = {"juicefs.bentoml.com/status": "not json"}
    result = review(pod_review_request(pod, "serving"), fuzzing.DEFAULT)
    assert result.outcome == "denied"
    assert "annotation juicefs.bentoml.com/status='not json' is invalid: expected" in result.reason
    pod["metadata"]["annotations"] = {"juicefs.bentoml.com/status": "[" * 100_000}
    assert fuzzing.check_result(pod, "serving", fuzzing.DEFAULT) == "denied"


@pytest.mark.parametrize(
    "value", ["llama\n", " llama", "llama/x", "..", "L" * 64, "a" * 64, "llama:v1"]
)
def test_a_bento_name_label_is_matched_whole(value: str) -> None:
    pod = bento_pod()
    pod["metadata"]["labels"]["yatai.ai/bento-repository"] = value
    result = review(pod_review_request(pod, "serving"), fuzzing.DEFAULT)
    assert result.outcome == "denied"
    assert "label yatai.ai/bento-repository=" in result.reason
    assert "at most 63 characters" in result.reason


@pytest.mark.parametrize("value", [" 20Gi", "20Gi ", "20Gi\n", "\t1Gi"])
def test_a_quantity_with_spaces_is_refused_not_copied_into_the_pod(value: str) -> None:
    pod = bento_pod()
    pod["metadata"]["annotations"] = {
        "juicefs.bentoml.com/cache-mode": "pod",
        "juicefs.bentoml.com/cache-size": value,
    }
    result = review(pod_review_request(pod, "serving"), fuzzing.DEFAULT)
    assert result.outcome == "denied"
    assert "juicefs.bentoml.com/cache-size=" in result.reason
