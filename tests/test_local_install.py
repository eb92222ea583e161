"""The local cluster's two installs of the injector (devcluster/installs/injector_pods.py) are one.

`make test` runs the e2e suite against the chart installed with the local
values file, and a part of it against the gke overlay with the local
kustomize patches; the two must install the same objects, as the shipped
chart and overlays do (tests/test_chart.py): rendered here with the pinned
Helm and kubectl, no cluster needed. The chart's install leaves the node
agent out whole (`nodeAgent.enabled: false`) and devcluster applies its
ServiceAccount and RBAC from manifests/base; the overlay leaves out only
the DaemonSet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from devcluster.installs.injector_pods import (
    CHART,
    DEPLOYMENT,
    helm_values,
    kustomize_overlay,
    node_agent_access,
)
from tests.kit.chart import (
    NAMESPACE,
    Key,
    dump,
    normalise,
    parse_objects,
    run_tool,
    tool_binaries,
    without_hooks,
)

SETTINGS: dict[str, dict[str, Any]] = {
    "cluster": {"kubernetesVersion": "1.37"},
    "cache": {"nodePath": "/tmp/bento-juicefs-e2e/node/local-ssd"},
    "server": {"certCheckIntervalSeconds": 2},
    "webhook": {"caBundleCheckSeconds": 2},
    "controller": {"resyncSeconds": 10},
}


def _key(doc: dict[str, Any]) -> Key:
    meta = doc["metadata"]
    return (doc["kind"], meta["name"], meta.get("namespace", ""))


def helm_install(work: Path) -> dict[Key, dict[str, Any]]:
    values = work / "values.yaml"
    values.write_text(yaml.safe_dump(helm_values(SETTINGS)))
    helm = str(tool_binaries()["helm"])
    objects = without_hooks(
        parse_objects(run_tool([helm, "template", "bento-juicefs", str(CHART), "-f", str(values)]))
    )
    # What PodInjector.install applies besides the chart (its `helm test` hooks aside).
    return {**objects, **{_key(doc): doc for doc in node_agent_access()}}


def kustomize_install(work: Path) -> dict[Key, dict[str, Any]]:
    overlay = kustomize_overlay(work / "overlay", SETTINGS)
    return parse_objects(run_tool([str(tool_binaries()["kubectl"]), "kustomize", str(overlay)]))


def test_the_local_helm_and_kustomize_installs_are_the_same_objects(tmp_path: Path) -> None:
    chart, overlay = helm_install(tmp_path), kustomize_install(tmp_path)
    assert sorted(chart) == sorted(overlay)
    for key in sorted(chart):
        assert dump(normalise(chart[key])) == dump(normalise(overlay[key])), key


def test_the_local_install_sets_only_what_the_machine_needs(tmp_path: Path) -> None:
    objects = kustomize_install(tmp_path)
    assert ("DaemonSet", "bento-juicefs-node-agent", NAMESPACE) not in objects
    deployment = objects[("Deployment", DEPLOYMENT, NAMESPACE)]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["imagePullPolicy"] == "Never"
    assert deployment["spec"]["replicas"] == 2
    config_map = objects[("ConfigMap", "bento-juicefs-injector-config", NAMESPACE)]
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert config["cache"]["nodePath"] == SETTINGS["cache"]["nodePath"]
    assert config["cluster"] == {"kubernetesVersion": "1.37", "platformProfile": "gke"}
    # No policy names a host path: no volume of a tenant pod is one.
    policy = objects[("ValidatingAdmissionPolicy", "bento-juicefs-sidecar-required", "")]
    assert "local-ssd" not in yaml.safe_dump(policy)
