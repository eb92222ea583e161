"""The chart and the overlays against a real apiserver: a strict server-side dry run.

tests/test_chart.py proves the chart and the overlays render the same objects;
this proves those objects are ones the apiserver accepts as written (strict
field validation: no unknown or duplicate field; the admission policies' CEL
compiles, with a custom cache.nodePath in the sidecar-required policy too).
Nothing is persisted. cert-manager's and the Prometheus Operator's objects
are left out: their CRDs are not on the cluster under test. So is the pod of
the `helm test` hook (templates/tests/check.yaml): admission looks up its
ServiceAccount, a hook that exists only while `helm test` runs (and in a dry
run, never); its ServiceAccount and RBAC are checked like the rest.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from devcluster import Cluster
from devcluster.binaries import CHART_COMPONENTS, ensure_binaries
from tests.kit.chart import HOOK, OVERLAYS, PROFILES, helm_text

OTHER_OPERATORS = ("cert-manager.io/", "monitoring.coreos.com/")


def _helm_test_pod(doc: dict[str, Any]) -> bool:
    """The pod of a `helm test` hook."""
    return doc["kind"] == "Pod" and HOOK in (doc["metadata"].get("annotations") or {})


def _dry_run(cluster: Cluster, text: str) -> str:
    docs = [
        doc
        for doc in yaml.safe_load_all(text)
        if doc and not doc["apiVersion"].startswith(OTHER_OPERATORS) and not _helm_test_pod(doc)
    ]
    proc = cluster.kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        "-",
        input=yaml.safe_dump_all(docs),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(server dry run)") == len(docs), proc.stdout
    return proc.stdout


@pytest.mark.parametrize(
    "sets",
    [
        (),
        ("profile=eks",),
        ("profile=aks",),
        ("profile=eks", "cache.nodePath=/var/lib/nvme/bento-juicefs", "nodeAgent.resyncSeconds=30"),
        (
            "certificates.mode=certManager",
            "metrics.serviceMonitor.enabled=true",
            "metrics.podMonitor.enabled=true",
        ),
        (
            # tests/test_chart.py's settings that other objects follow, changed.
            "config.labels.namespaceOptIn=example.com/bento-models",
            "config.labels.modelStore=example.com/store",
            "config.labels.modelStoreValue=jfs",
            "config.labels.inject=example.com/inject",
            "config.webhook.excludedNamespaces={kube-system,platform}",
            # Not config.server.port: a dry-run apply merges the container's
            # ports with the installed Deployment's (keyed by containerPort),
            # so a new port reads as a second `https`. tests/test_chart.py
            # checks that every copy of the port follows the config.
            "webhook.failurePolicy=Fail",
            "webhook.timeoutSeconds=10",
            "injector.replicas=1",
            "metrics.sidecarPodMonitor.enabled=true",
        ),
        (
            # tests/test_chart_knobs.py's knobs, each set (PriorityClasses the
            # apiserver has built in; the pull secret need not exist).
            "imagePullSecrets[0].name=regcred",
            "injector.priorityClassName=system-cluster-critical",
            "injector.nodeSelector.pool=system",
            "injector.tolerations[0].key=dedicated",
            "injector.tolerations[0].operator=Exists",
            "injector.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution"
            "[0].weight=1",
            "injector.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution"
            "[0].preference.matchExpressions[0].key=pool",
            "injector.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution"
            "[0].preference.matchExpressions[0].operator=Exists",
            "injector.podAnnotations.example\\.com/team=platform",
            "injector.podLabels.team=platform",
            "injector.extraEnv[0].name=TZ",
            "injector.extraEnv[0].value=UTC",
            "injector.hostNetwork=true",
            "nodeAgent.priorityClassName=system-node-critical",
            "nodeAgent.nodeSelector.pool=gpu",
            "nodeAgent.podAnnotations.example\\.com/team=platform",
            "nodeAgent.podLabels.team=platform",
            "nodeAgent.extraEnv[0].name=TZ",
            "nodeAgent.extraEnv[0].value=UTC",
        ),
    ],
    ids=["gke", "eks", "aks", "eks-node-path", "cert-manager", "one-source", "knobs"],
)
def test_the_apiserver_accepts_the_chart(cluster: Cluster, sets: tuple[str, ...]) -> None:
    _dry_run(cluster, helm_text(*sets))


@pytest.mark.parametrize("profile", PROFILES)
def test_the_apiserver_accepts_the_overlays(cluster: Cluster, profile: str) -> None:
    kubectl = ensure_binaries(CHART_COMPONENTS)["kubectl"]
    text = subprocess.run(
        [str(kubectl), "kustomize", str(OVERLAYS / profile)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    _dry_run(cluster, text)
