"""Pod Security Admission on a real apiserver: the injector denies first, and says why.

In a namespace that enforces `baseline` or `restricted`, the PodSecurity
admission plugin (enabled on the local apiserver with Kubernetes' default
AdmissionConfiguration) would reject an injected Bento pod, listing
violations of a container the user never wrote. The injector denies it
before that, from the namespace's labels its namespace controller keeps,
with what to do; the two ways out it names both work.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from devcluster import Cluster, wait_for

OPT_IN = {"juicefs.bentoml.com/injection": "enabled"}
ENFORCE = "pod-security.kubernetes.io/enforce"
ENFORCE_VERSION = "pod-security.kubernetes.io/enforce-version"
OURS = 'admission webhook "inject.juicefs.bentoml.com" denied the request: JuiceFS model injection'
IMAGE = "us-docker.pkg.dev/acme/bentos/llama3:v1"

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
            "labels": {
                "juicefs.bentoml.com/model-store": "juicefs",
                "yatai.ai/bento-repository": "llama3-service",
                "yatai.ai/bento-version": "v1",
                **labels,
            },
        },
        # Restricted-clean on its own: only what the injector adds breaks the level.
        "spec": {
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


def create(
    cluster: Cluster, namespace: str, obj: dict[str, Any], *extra: str
) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(
        "create", "-n", namespace, "-f", "-", *extra, input=json.dumps(obj), check=False
    )


def denial_once_seen(cluster: Cluster, namespace: str) -> str:
    """The injector's denial of a Bento pod (server-side dry run), once it has seen the labels."""

    def attempt() -> str | None:
        result = create(cluster, namespace, bento_pod("probe"), "--dry-run=server")
        return result.stderr if OURS in result.stderr and "Pod Security" in result.stderr else None

    found: str = wait_for(attempt, timeout=30, what="the injector's Pod Security denial")
    return found


@pytest.mark.parametrize(
    ("labels", "level"),
    [
        ({ENFORCE: "baseline"}, "baseline:latest"),
        ({ENFORCE: "restricted", ENFORCE_VERSION: "v1.25"}, "restricted:v1.25"),
    ],
)
def test_a_bento_pod_is_denied_by_the_injector_with_what_to_do(
    cluster: Cluster, new_namespace: NewNamespace, labels: dict[str, str], level: str
) -> None:
    namespace = new_namespace({**OPT_IN, **labels})
    denial_once_seen(cluster, namespace)
    result = create(cluster, namespace, bento_pod("llama"))
    assert result.returncode != 0
    message = result.stderr
    print(message)
    assert OURS in message
    assert f"namespace {namespace} enforces Pod Security level {level}" in message
    assert "juicefs-mount sidecar" in message
    assert "privileged, as root, to mount the models with FUSE" in message
    assert f"kubectl label namespace {namespace} {ENFORCE}=privileged --overwrite" in message
    assert "juicefs.bentoml.com/inject=false" in message
    # Not Pod Security's own rejection, which would list the sidecar's fields.
    assert "violates PodSecurity" not in message
    missing = cluster.kubectl("get", "pod", "llama", "-n", namespace, check=False)
    assert missing.returncode != 0


def test_a_deployments_pods_report_the_denial_on_the_replicaset(
    cluster: Cluster, new_namespace: NewNamespace
) -> None:
    namespace = new_namespace({**OPT_IN, ENFORCE: "baseline"})
    denial_once_seen(cluster, namespace)
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
    assert create(cluster, namespace, deployment).returncode == 0

    def failed_create() -> str | None:
        events = cluster.get_json(
            "events", "-n", namespace, "--field-selector", "reason=FailedCreate"
        )
        messages = [
            e["message"] for e in events["items"] if "JuiceFS model injection" in e["message"]
        ]
        return messages[0] if messages else None

    message = wait_for(failed_create, timeout=60, what="the ReplicaSet's FailedCreate event")
    print(message)
    assert "enforces Pod Security level baseline:latest" in message
    assert f"{ENFORCE}=privileged" in message


def test_both_ways_out_work(cluster: Cluster, new_namespace: NewNamespace) -> None:
    namespace = new_namespace({**OPT_IN, ENFORCE: "baseline"})
    denial_once_seen(cluster, namespace)
    # 1. Opt the pod out: not injected, so Pod Security has nothing to refuse
    #    (and the sidecar-required policy lets an opted-out pod through).
    opted_out = bento_pod("opted-out", **{"juicefs.bentoml.com/inject": "false"})
    result = create(cluster, namespace, opted_out)
    assert result.returncode == 0, result.stderr
    pod = cluster.get_json("pod", "opted-out", "-n", namespace)
    assert "initContainers" not in pod["spec"]
    # 2. Label the namespace privileged: the very same pod is now injected (no
    #    answer cached before the change is replayed).
    cluster.kubectl("label", "namespace", namespace, f"{ENFORCE}=privileged", "--overwrite")

    def admitted() -> bool:
        return create(cluster, namespace, bento_pod("llama")).returncode == 0

    wait_for(admitted, timeout=30, what="the pod admitted once the namespace is privileged")
    pod = cluster.get_json("pod", "llama", "-n", namespace)
    assert pod["spec"]["initContainers"][0]["name"] == "juicefs-mount"
    assert pod["spec"]["initContainers"][0]["securityContext"]["privileged"] is True


def test_without_the_label_the_clusters_default_privileged_applies(
    cluster: Cluster, new_namespace: NewNamespace
) -> None:
    """No enforce label: Kubernetes' default AdmissionConfiguration, privileged."""
    namespace = new_namespace(OPT_IN)
    result = create(cluster, namespace, bento_pod("llama"))
    assert result.returncode == 0, result.stderr
    pod = cluster.get_json("pod", "llama", "-n", namespace)
    assert pod["spec"]["initContainers"][0]["name"] == "juicefs-mount"


def test_what_pod_security_itself_would_have_said(
    cluster: Cluster, new_namespace: NewNamespace
) -> None:
    """The rejection users got before: the injected pod, dry-run in a baseline namespace."""
    privileged = new_namespace({**OPT_IN, ENFORCE: "privileged"})
    injected = create(cluster, privileged, bento_pod("llama"), "--dry-run=server", "-o", "json")
    assert injected.returncode == 0, injected.stderr
    pod = json.loads(injected.stdout)
    for key in ("uid", "resourceVersion", "creationTimestamp", "namespace"):
        pod["metadata"].pop(key, None)
    pod.pop("status", None)
    # Not opted in: the injector stays out, Pod Security judges the pod as injected.
    locked = new_namespace({ENFORCE: "baseline"})
    result = create(cluster, locked, pod)
    assert result.returncode != 0
    print(result.stderr)
    assert 'violates PodSecurity "baseline:latest"' in result.stderr
    assert "juicefs-mount" in result.stderr
