"""The chart's knobs platform teams expect, named as the anchors' charts name them.

priorityClassName, nodeSelector, tolerations, affinity, podAnnotations,
podLabels and extraEnv for the injector and the node agent, the top-level
imagePullSecrets (which reach the injected sidecars through the config),
and injector.hostNetwork: each rendered with `helm template` (the pinned
Helm, tests/kit/chart.py), with the defaults rendering none of it (which
tests/test_chart.py's comparison with the overlays also holds).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from injector.config import parse_config
from tests.helpers import bento_pod, inject
from tests.kit.chart import (
    CHART,
    CHECKSUM,
    CONFIG_MAP,
    DEPLOYMENT,
    NAMESPACE,
    Key,
    helm,
    parse_objects,
    pod_spec,
    run_tool,
    tool_binaries,
)

DAEMON_SET = ("DaemonSet", "bento-juicefs-node-agent", NAMESPACE)
PODS = (DEPLOYMENT, DAEMON_SET)

TOLERATION = {"key": "dedicated", "operator": "Equal", "value": "platform", "effect": "NoSchedule"}
AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}
            ]
        }
    }
}
SECRET_ENV = {
    "name": "HTTPS_PROXY",
    "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "url"}},
}

# Every knob set, as a values file would set it.
KNOBS: dict[str, Any] = {
    "imagePullSecrets": [{"name": "regcred"}, {"name": "mirror"}],
    "injector": {
        "priorityClassName": "platform-critical",
        "nodeSelector": {"pool": "system"},
        "tolerations": [TOLERATION],
        "affinity": AFFINITY,
        "podAnnotations": {"example.com/team": "platform"},
        "podLabels": {"team": "platform"},
        "extraEnv": [{"name": "TZ", "value": "UTC"}, SECRET_ENV],
        "hostNetwork": True,
    },
    "nodeAgent": {
        "priorityClassName": "system-node-critical",
        "nodeSelector": {"pool": "gpu"},
        "podAnnotations": {"example.com/team": "platform"},
        "podLabels": {"team": "platform"},
        "extraEnv": [{"name": "TZ", "value": "UTC"}],
    },
    "config": {"server": {"port": 10260}},
}


def helm_values(tmp_path: Path, values: dict[str, Any], *sets: str) -> dict[Key, dict[str, Any]]:
    """`helm template` with a values file (lists of objects do not fit --set well)."""
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    args = [str(tool_binaries()["helm"]), "template", "bento-juicefs", str(CHART), "-f", str(path)]
    for item in sets:
        args += ["--set", item]
    return parse_objects(run_tool(args))


def refusal(*args: str) -> str:
    """helm's stderr for a render that must fail."""
    command = [str(tool_binaries()["helm"]), "template", "x", str(CHART), *args]
    proc = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode != 0, proc.stdout
    return proc.stderr


def pod_metadata(objects: dict[Key, dict[str, Any]], key: Key) -> dict[str, Any]:
    metadata = objects[key]["spec"]["template"]["metadata"]
    assert isinstance(metadata, dict)
    return metadata


def config_of(objects: dict[Key, dict[str, Any]]) -> dict[str, Any]:
    data = yaml.safe_load(objects[CONFIG_MAP]["data"]["config.yaml"])
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def knobs(tmp_path_factory: pytest.TempPathFactory) -> dict[Key, dict[str, Any]]:
    return helm_values(tmp_path_factory.mktemp("knobs"), KNOBS)


def test_the_defaults_render_none_of_the_knobs() -> None:
    objects = helm()
    for key in PODS:
        spec = pod_spec(objects, key)
        for field in ("priorityClassName", "imagePullSecrets", "hostNetwork", "dnsPolicy"):
            assert field not in spec, (key, field)
        assert set(pod_metadata(objects, key)["annotations"]) == {CHECKSUM}
    injector = pod_spec(objects, DEPLOYMENT)
    for field in ("nodeSelector", "tolerations", "affinity"):
        assert field not in injector
    assert "env" not in injector["containers"][0]
    assert "imagePullSecrets" not in config_of(objects)["sidecar"]


def test_priority_class_names(knobs: dict[Key, dict[str, Any]]) -> None:
    assert pod_spec(knobs, DEPLOYMENT)["priorityClassName"] == "platform-critical"
    assert pod_spec(knobs, DAEMON_SET)["priorityClassName"] == "system-node-critical"


def test_the_injectors_placement(knobs: dict[Key, dict[str, Any]]) -> None:
    spec = pod_spec(knobs, DEPLOYMENT)
    assert spec["nodeSelector"] == {"pool": "system"}
    assert spec["tolerations"] == [TOLERATION]
    assert spec["affinity"] == AFFINITY
    # The chart's own spread over nodes stays beside the affinity.
    assert (
        spec["topologySpreadConstraints"]
        == pod_spec(helm(), DEPLOYMENT)["topologySpreadConstraints"]
    )


def test_pod_annotations_and_labels_add_to_the_charts_own(
    knobs: dict[Key, dict[str, Any]],
) -> None:
    default = helm()
    for key in PODS:
        metadata = pod_metadata(knobs, key)
        own = pod_metadata(default, key)["labels"]
        assert metadata["labels"] == {**own, "team": "platform"}
        assert metadata["annotations"]["example.com/team"] == "platform"
        assert CHECKSUM in metadata["annotations"]
        # What the controller selects is the chart's alone.
        assert knobs[key]["spec"]["selector"] == default[key]["spec"]["selector"]
    # Not part of the config: they do not roll the pods by the checksum.
    assert (
        pod_metadata(helm("injector.podAnnotations.a=b"), DEPLOYMENT)["annotations"][CHECKSUM]
        == pod_metadata(default, DEPLOYMENT)["annotations"][CHECKSUM]
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "injector.podLabels.app\\.kubernetes\\.io/name=x",
            "injector.podLabels: app.kubernetes.io/name is the chart's own",
        ),
        (
            "nodeAgent.podLabels.app\\.kubernetes\\.io/name=x",
            "nodeAgent.podLabels: app.kubernetes.io/name is the chart's own",
        ),
        (
            "injector.podAnnotations.checksum/config=x",
            "injector.podAnnotations: checksum/config is the chart's own",
        ),
        (
            "nodeAgent.podAnnotations.checksum/config=x",
            "nodeAgent.podAnnotations: checksum/config is the chart's own",
        ),
        ("nodeAgent.extraEnv[0].name=NODE_NAME", "nodeAgent.extraEnv: NODE_NAME is set by"),
        (
            "nodeAgent.nodeSelector.cloud\\.google\\.com/gke-ephemeral-storage-local-ssd=other",
            "set ssdNodeLabel instead",
        ),
        (
            "image.pullSecrets[0].name=regcred",
            "image.pullSecrets was renamed: set imagePullSecrets",
        ),
        ("imagePullSecrets[0].nme=regcred", "imagePullSecrets/0"),
        ("injector.hostNetwork=yes", "injector/hostNetwork"),
        ("injector.podLabels.team=1", "injector/podLabels/team"),
        ("nodeAgent.extraEnv[0].value=x", "nodeAgent/extraEnv/0"),
    ],
)
def test_the_chart_refuses_knobs_that_would_undo_its_own(value: str, message: str) -> None:
    assert message in refusal("--set", value)


def test_extra_env(knobs: dict[Key, dict[str, Any]]) -> None:
    (injector,) = pod_spec(knobs, DEPLOYMENT)["containers"]
    assert injector["env"] == [{"name": "TZ", "value": "UTC"}, SECRET_ENV]
    agent = pod_spec(knobs, DAEMON_SET)["containers"][0]
    own = pod_spec(helm(), DAEMON_SET)["containers"][0]["env"]
    assert [e["name"] for e in own] == ["NODE_NAME", "POD_NAME", "POD_NAMESPACE"]
    assert agent["env"] == [*own, {"name": "TZ", "value": "UTC"}]


def test_image_pull_secrets_reach_the_chart_pods_and_the_injected_sidecars(
    knobs: dict[Key, dict[str, Any]],
) -> None:
    secrets = [{"name": "regcred"}, {"name": "mirror"}]
    for key in PODS:
        assert pod_spec(knobs, key)["imagePullSecrets"] == secrets
    config = parse_config(config_of(knobs))
    assert config.sidecar.image_pull_secrets == ("regcred", "mirror")
    # The injector with that config adds them to a Bento pod, after its own.
    pod = bento_pod(imagePullSecrets=[{"name": "app"}, {"name": "mirror"}])
    assert inject(pod, config)["spec"]["imagePullSecrets"] == [
        {"name": "app"},
        {"name": "mirror"},
        {"name": "regcred"},
    ]
    # They are in the config, so changing them rolls the pods.
    default = helm()
    assert (
        pod_metadata(knobs, DEPLOYMENT)["annotations"][CHECKSUM]
        != pod_metadata(default, DEPLOYMENT)["annotations"][CHECKSUM]
    )


def test_the_configs_own_sidecar_pull_secrets_win(tmp_path: Path) -> None:
    objects = helm_values(
        tmp_path,
        {
            "imagePullSecrets": [{"name": "regcred"}],
            "config": {"sidecar": {"imagePullSecrets": ["tenant-registry"]}},
        },
    )
    assert pod_spec(objects, DEPLOYMENT)["imagePullSecrets"] == [{"name": "regcred"}]
    assert parse_config(config_of(objects)).sidecar.image_pull_secrets == ("tenant-registry",)


def test_host_network(knobs: dict[Key, dict[str, Any]]) -> None:
    spec = pod_spec(knobs, DEPLOYMENT)
    assert (spec["hostNetwork"], spec["dnsPolicy"]) == (True, "ClusterFirstWithHostNet")
    # The webhook's port is the config's, on the node now: the Service, the
    # webhook and the probes follow it by name.
    (container,) = spec["containers"]
    assert container["ports"] == [{"name": "https", "containerPort": 10260}]
    assert parse_config(config_of(knobs)).server.port == 10260
    (service_port,) = knobs[("Service", "bento-juicefs-injector", NAMESPACE)]["spec"]["ports"]
    assert service_port["targetPort"] == "https"
    # Only the injector: the agent's network is the pod's as before.
    assert "hostNetwork" not in pod_spec(knobs, DAEMON_SET)


@pytest.mark.parametrize(
    ("profile", "selector"),
    [
        (
            "gke",
            {"cloud.google.com/gke-ephemeral-storage-local-ssd": "true", "pool": "gpu"},
        ),
        # An exists-only SSD label stays a required node affinity beside it.
        ("eks", {"pool": "gpu"}),
    ],
)
def test_the_agents_node_selector_narrows_the_ssd_nodes(
    tmp_path: Path, profile: str, selector: dict[str, str]
) -> None:
    objects = helm_values(tmp_path, {**KNOBS, "profile": profile})
    spec = pod_spec(objects, DAEMON_SET)
    assert spec["nodeSelector"] == selector
    assert ("affinity" in spec) == (profile == "eks")
    # Its tolerations stay the chart's (GPU pools) unless set.
    assert spec["tolerations"] == pod_spec(helm(), DAEMON_SET)["tolerations"]


def test_helm_lint_strict_with_every_knob(tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(KNOBS))
    out = run_tool([str(tool_binaries()["helm"]), "lint", "--strict", str(CHART), "-f", str(path)])
    assert "0 chart(s) failed" in out


def test_the_notes_name_the_pull_secrets_for_the_tenant_namespaces() -> None:
    args = [
        str(tool_binaries()["helm"]),
        "install",
        "bento-juicefs",
        str(CHART),
        "--dry-run=client",
        "--set",
        "imagePullSecrets[0].name=regcred",
    ]
    env = {**os.environ, "KUBECONFIG": "/nonexistent/kubeconfig"}  # no cluster reached
    for command, expected in ((args, True), (args[:-2], False)):
        proc = subprocess.run(
            command, capture_output=True, text=True, check=True, timeout=120, env=env
        )
        notes = proc.stdout[proc.stdout.index("NOTES:") :]
        assert ("imagePullSecrets regcred:" in notes) == expected, notes
