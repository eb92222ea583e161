"""The Bento pods in the opted-in namespaces: not injected, another sidecar image, a gate stuck."""

from __future__ import annotations

import datetime as dt
from typing import Any

from injector.check.pods import (
    check_image_skew,
    check_not_injected,
    check_stuck_gates,
    closed_gate,
    sidecar_image,
)
from injector.check.state import Unreadable
from injector.config import InjectorConfig

CONFIG = InjectorConfig()
NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
IMAGE = CONFIG.sidecar.image
OLD_IMAGE = "ghcr.io/bentoml/bento-juicefs-sidecar:0.0.9"
GATE = CONFIG.readiness.condition_type
BENTO = {CONFIG.labels.model_store: CONFIG.labels.model_store_value}


def pod(
    name: str,
    namespace: str = "team",
    *,
    injected: bool = True,
    labels: dict[str, str] | None = None,
    image: str = IMAGE,
    native: bool = True,
    gate: tuple[str, dt.timedelta, str, str] | None = None,
) -> dict[str, Any]:
    """A Bento pod; injected: the status annotation and the sidecar; gate: (status, age, why)."""
    annotations = {CONFIG.annotations.status: '{"injected": true}'} if injected else {}
    spec: dict[str, Any] = {"containers": [{"name": "bento", "image": "bento:1"}]}
    if injected:
        sidecar = {"name": CONFIG.sidecar.container_name, "image": image}
        if native:
            spec["initContainers"] = [{**sidecar, "restartPolicy": "Always"}]
        else:
            spec["containers"].insert(0, sidecar)
    conditions = []
    if gate is not None:
        status, age, reason, message = gate
        conditions.append(
            {
                "type": GATE,
                "status": status,
                "lastTransitionTime": (NOW - age).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "reason": reason,
                "message": message,
            }
        )
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": BENTO if labels is None else labels,
            "annotations": annotations,
        },
        "spec": spec,
        "status": {"conditions": conditions},
    }


# -- labelled but not injected ----------------------------------------------------------


def test_injected_pods_are_ok_and_counted() -> None:
    (row,) = check_not_injected({"team": [pod("a"), pod("b")], "ml": []}, CONFIG)
    assert (row.id, row.verdict, row.subject) == ("pod-not-injected", "ok", "Bento pods")
    assert row.found.startswith("2 pods labelled juicefs.bentoml.com/model-store=juicefs")


def test_a_labelled_pod_without_the_status_annotation_is_a_warning() -> None:
    pods = {"team": [pod("a"), pod("old-1", injected=False), pod("old-2", injected=False)]}
    (row,) = check_not_injected(pods, CONFIG)
    assert (row.id, row.verdict, row.subject) == ("pod-not-injected", "warn", "namespace team")
    assert "2 pods labelled juicefs.bentoml.com/model-store=juicefs but not injected" in row.found
    assert "old-1, old-2" in row.found
    assert (
        "created before the namespace opted in, or the webhook was down with failurePolicy Ignore"
        in row.found
    )
    assert "rollout restart" in row.fix


def test_a_pod_opted_out_is_not_expected_to_be_injected() -> None:
    opted_out = pod("x", injected=False, labels={**BENTO, CONFIG.labels.inject: "false"})
    unlabelled = pod("y", injected=False, labels={})
    (row,) = check_not_injected({"team": [opted_out, unlabelled]}, CONFIG)
    assert row.verdict == "ok"
    assert row.found.startswith("0 pods labelled")


def test_pods_that_cannot_be_listed_are_not_judged() -> None:
    rows = check_not_injected({"team": Unreadable("403 Forbidden"), "ml": [pod("a")]}, CONFIG)
    assert [(r.id, r.subject, r.verdict) for r in rows] == [
        ("pod-not-injected", "namespace team", "warn")
    ]
    assert "cannot read its pods: 403 Forbidden" in rows[0].found
    assert check_image_skew({"team": Unreadable("403 Forbidden")}, CONFIG)[0].verdict == "ok"
    assert check_stuck_gates({"team": Unreadable("x")}, CONFIG, NOW)[0].verdict == "ok"


# -- sidecar image skew -----------------------------------------------------------------


def test_the_sidecar_is_found_native_or_classic() -> None:
    assert sidecar_image(pod("a"), CONFIG) == IMAGE
    assert sidecar_image(pod("a", native=False, image=OLD_IMAGE), CONFIG) == OLD_IMAGE
    assert sidecar_image(pod("a", injected=False), CONFIG) is None


def test_every_sidecar_on_the_configured_image_is_ok() -> None:
    (row,) = check_image_skew({"team": [pod("a"), pod("b", injected=False)]}, CONFIG)
    assert (row.id, row.verdict) == ("sidecar-image-skew", "ok")
    assert row.found == f"1 injected pod, each running {IMAGE}"


def test_another_sidecar_image_is_a_warning_per_image() -> None:
    pods = {
        "team": [pod("a"), pod("b", image=OLD_IMAGE)],
        "ml": [pod("c", "ml", image=OLD_IMAGE, native=False), pod("d", "ml", image="x:1")],
    }
    rows = check_image_skew(pods, CONFIG)
    assert [(r.id, r.subject, r.verdict) for r in rows] == [
        ("sidecar-image-skew", f"image {OLD_IMAGE}", "warn"),
        ("sidecar-image-skew", "image x:1", "warn"),
    ]
    assert rows[0].found == (
        f"2 pods run juicefs-mount {OLD_IMAGE}, not the config's {IMAGE}: ml/c, team/b "
        "(injected before an upgrade, their workloads not restarted since)"
    )
    assert "rollout restart" in rows[0].fix


# -- readiness gate stuck closed --------------------------------------------------------


def test_a_gate_closed_briefly_or_open_is_fine() -> None:
    fresh = pod("a", gate=("False", dt.timedelta(minutes=14), "Warming", "3 of 10 GiB"))
    opened = pod("b", gate=("True", dt.timedelta(hours=5), "ModelsReady", ""))
    none_yet = pod("c")
    (row,) = check_stuck_gates({"team": [fresh, opened, none_yet]}, CONFIG, NOW)
    assert (row.id, row.verdict) == ("readiness-gate-stuck", "ok")
    assert row.found == f"no readiness gate {GATE} closed for more than 15 minutes"


def test_a_gate_closed_for_long_is_a_warning_with_its_reason_and_message() -> None:
    stuck = pod(
        "a",
        gate=("False", dt.timedelta(minutes=42), "WarmupStalled", "no bytes for 30 s"),
    )
    (row,) = check_stuck_gates({"team": [stuck]}, CONFIG, NOW)
    assert (row.id, row.subject, row.verdict) == ("readiness-gate-stuck", "pod team/a", "warn")
    assert row.found == (
        f"readiness gate {GATE} False for 42 minutes (WarmupStalled: no bytes for 30 s): "
        "the pod gets no traffic"
    )
    assert row.fix.startswith("kubectl -n team describe pod a; ")


def test_a_gate_time_that_does_not_parse_is_not_judged() -> None:
    bad = pod("a", gate=("False", dt.timedelta(hours=1), "R", "m"))
    bad["status"]["conditions"][0]["lastTransitionTime"] = "yesterday"
    assert closed_gate(bad, CONFIG, NOW) is None
    naive = pod("b", gate=("False", dt.timedelta(hours=1), "R", ""))
    naive["status"]["conditions"][0]["lastTransitionTime"] = "2025-06-01T10:00:00"
    closed = closed_gate(naive, CONFIG, NOW)
    assert closed is not None
    assert closed[0] == dt.timedelta(hours=2)
    assert closed[1:] == ("R", "")
