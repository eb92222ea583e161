"""Pod Security Admission on a real apiserver: any level of an opted-in namespace works.

What the injector adds passes `restricted` (a non-root sidecar without
capabilities, emptyDir volumes only), so a Bento pod in an opted-in
namespace that enforces `baseline` or `restricted` is injected and admitted,
and the PodSecurity admission plugin (enabled on the local apiserver with
Kubernetes' default AdmissionConfiguration), which runs after every
mutating webhook, finds nothing to warn about in what was injected. The
injector itself never denies a pod for Pod Security: it does not know the
namespace's level.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from devcluster import Cluster, wait_for
from tests.e2e.pods import NOWHERE, bento_labels, kubectl_create

OPT_IN = {"juicefs.bentoml.com/injection": "enabled"}
ENFORCE = "pod-security.kubernetes.io/enforce"
ENFORCE_VERSION = "pod-security.kubernetes.io/enforce-version"
WARN = "pod-security.kubernetes.io/warn"
AUDIT = "pod-security.kubernetes.io/audit"
IMAGE = "us-docker.pkg.dev/acme/bentos/llama3:v1"
SIDECAR = "juicefs-mount"

NewNamespace = Callable[[dict[str, str]], str]


@pytest.fixture
def new_namespace(cluster: Cluster) -> Iterator[NewNamespace]:
    created: list[str] = []

    def make(labels: dict[str, str]) -> str:
        name = f"e2e-psa-{uuid.uuid4().hex[:6]}"
        cluster.create_namespace(name, labels)
        created.append(name)
        return name

    yield make
    for name in created:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def bento_pod(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {**bento_labels("llama3-service", "v1"), **labels},
        },
        # Restricted-clean on its own: whatever Pod Security says is about what was added.
        # Off every node (its Bento is published nowhere): admission is what is checked.
        "spec": {
            "nodeSelector": NOWHERE,
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "main",
                    "image": IMAGE,
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def injected_dry_run(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    """The pod as the apiserver would store it (server-side dry run: every admission runs)."""
    result = kubectl_create(cluster, namespace, bento_pod(name), "--dry-run=server", "-o", "json")
    assert result.returncode == 0, result.stderr
    assert "PodSecurity" not in result.stderr, result.stderr  # no warning either
    pod: dict[str, Any] = json.loads(result.stdout)
    return pod


def sidecar_of(pod: dict[str, Any]) -> dict[str, Any]:
    (sidecar,) = [c for c in pod["spec"].get("initContainers") or [] if c["name"] == SIDECAR]
    return dict(sidecar)


@pytest.mark.parametrize(
    "labels",
    [
        {ENFORCE: "baseline"},
        {ENFORCE: "restricted"},
        {ENFORCE: "restricted", ENFORCE_VERSION: "v1.25"},
        {},  # Kubernetes' default: privileged
    ],
    ids=["baseline", "restricted", "restricted-v1.25", "no-label"],
)
def test_a_bento_pod_is_injected_and_admitted_at_any_level(
    cluster: Cluster, new_namespace: NewNamespace, labels: dict[str, str]
) -> None:
    # warn and audit at restricted too: Pod Security would print what it disliked.
    namespace = new_namespace({**OPT_IN, **labels, WARN: "restricted", AUDIT: "restricted"})
    result = kubectl_create(cluster, namespace, bento_pod("llama"))
    print(result.stderr)
    assert result.returncode == 0, result.stderr
    assert "violate" not in result.stderr
    pod = cluster.get_json("pod", "llama", "-n", namespace)
    sidecar = sidecar_of(pod)
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in sidecar["securityContext"]
    assert not [v for v in pod["spec"]["volumes"] if "hostPath" in v]


def test_a_deployments_pods_are_created_in_a_restricted_namespace(
    cluster: Cluster, new_namespace: NewNamespace
) -> None:
    """What a ReplicaSet controller creates is admitted too: no FailedCreate."""
    namespace = new_namespace({**OPT_IN, ENFORCE: "restricted"})
    pod = bento_pod("unused")
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "llama"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "llama"}},
            "template": {
                "metadata": {"labels": {**pod["metadata"]["labels"], "app": "llama"}},
                "spec": pod["spec"],
            },
        },
    }
    assert kubectl_create(cluster, namespace, deployment).returncode == 0

    def created() -> dict[str, Any] | None:
        pods = cluster.get_json("pods", "-n", namespace, "-l", "app=llama")["items"]
        return pods[0] if pods else None

    made: dict[str, Any] = wait_for(created, timeout=60, what="the Deployment's pod")
    assert sidecar_of(made)["securityContext"]["runAsNonRoot"] is True
    events = cluster.get_json("events", "-n", namespace, "--field-selector", "reason=FailedCreate")
    assert events["items"] == []


def test_pod_security_itself_admits_the_injected_pod_at_restricted(
    cluster: Cluster, new_namespace: NewNamespace
) -> None:
    """The injected pod judged by the plugin alone, in a namespace the injector stays out of."""
    opted_in = new_namespace({**OPT_IN, ENFORCE: "privileged"})
    pod = injected_dry_run(cluster, opted_in, "llama")
    for key in ("uid", "resourceVersion", "creationTimestamp", "namespace"):
        pod["metadata"].pop(key, None)
    pod.pop("status", None)
    assert sidecar_of(pod)["name"] == SIDECAR
    # Not opted in: neither the webhook nor our policies see it; Pod Security does.
    locked = new_namespace({ENFORCE: "restricted"})
    result = kubectl_create(cluster, locked, pod, "--dry-run=server")
    print(result.stderr)
    assert result.returncode == 0, result.stderr
    assert "violates PodSecurity" not in result.stderr
