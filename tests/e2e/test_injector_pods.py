"""The injector as real pods: the chart (or the gke overlay) installed on the local node.

devcluster installs the injector the way users do (devcluster/injector_pods.py:
`helm upgrade --install` by default, `kubectl apply -k` over
manifests/overlays/gke with BENTO_INJECTOR_INSTALL=kustomize): the
Deployment's two replicas run on the real node from the locally built image,
and the apiserver calls them at the webhook Service's endpoints. The rest of
the e2e suite runs against that install; these tests look at the install
itself, and at a rollout of it under load.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from devcluster import Cluster, ControlPlane
from devcluster.binaries import ensure_binaries
from devcluster.images import PROJECT_IMAGE
from devcluster.injector import NAMESPACE, InjectorInstall
from devcluster.injector_ha import Api
from devcluster.injector_pods import (
    DEPLOYMENT,
    PORT,
    RELEASE,
    RELEASE_NAMESPACE,
    SERVICE,
    PodInjector,
)
from devcluster.node import Node
from tests.e2e.podload import PodLoad
from tests.e2e.pods import opted_in_namespace

WEBHOOK = "bento-juicefs-injector"


@pytest.fixture(scope="module")
def pods_injector(injector: InjectorInstall) -> PodInjector:
    if not isinstance(injector, PodInjector):
        pytest.skip("the injector runs as a local process (BENTO_INJECTOR_INSTALL=process)")
    return injector


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    with opted_in_namespace(cluster, "e2e-pods", provisioned=False) as name:
        yield name


def test_two_replicas_run_on_the_node_from_the_local_image(
    cluster: Cluster, node: Node, pods_injector: PodInjector
) -> None:
    pods = pods_injector.pods()
    assert len(pods) == 2
    for pod in pods:
        assert pod["spec"]["nodeName"] == node.name
        (container,) = pod["spec"]["containers"]
        assert container["image"] == PROJECT_IMAGE
        assert container["imagePullPolicy"] == "Never"  # imported, no registry
        (status,) = pod["status"]["containerStatuses"]
        assert status["ready"]
        assert status["restartCount"] == 0, pod["metadata"]["name"]
        assert pod["spec"]["serviceAccountName"] == "bento-juicefs-injector"
        assert pod["spec"]["securityContext"]["runAsNonRoot"]
    owners = {ref["kind"] for p in pods for ref in p["metadata"]["ownerReferences"]}
    assert owners == {"ReplicaSet"}

    # The apiserver calls the Service (at its endpoints: aggregator routing).
    hook = cluster.get_json("mutatingwebhookconfiguration", WEBHOOK)["webhooks"][0]
    assert "url" not in hook["clientConfig"]
    assert hook["clientConfig"]["service"]["name"] == SERVICE
    assert hook["clientConfig"]["service"]["namespace"] == NAMESPACE
    assert pods_injector.endpoints() == sorted(f"{p['status']['podIP']}:{PORT}" for p in pods)

    if pods_injector.method == "helm":
        helm = ensure_binaries(["helm"])["helm"]
        status = json.loads(
            cluster_helm(cluster, str(helm), "status", RELEASE, "-n", RELEASE_NAMESPACE)
        )
        assert status["info"]["status"] == "deployed"
        deployment = cluster.get_json("deployment", DEPLOYMENT, "-n", NAMESPACE)
        labels = deployment["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
    print(f"installed by {pods_injector.method}: {pods_injector.endpoints()}")


def cluster_helm(cluster: Cluster, helm: str, *args: str) -> str:
    result = subprocess.run(
        [helm, "--kubeconfig", str(cluster.kubeconfig), *args, "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def reviews_by_replica(pods_injector: PodInjector) -> dict[str, int]:
    """admission.decided log lines per injector pod."""
    counts: dict[str, int] = {}
    for pod in pods_injector.pods():
        name = pod["metadata"]["name"]
        out = pods_injector.cp.kubectl("logs", "-n", NAMESPACE, name, "--tail=-1").stdout
        counts[name] = sum('"admission.decided"' in line for line in out.splitlines())
    return counts


def test_a_rollout_under_load_fails_no_creation_and_both_replicas_serve(
    cluster: Cluster, pods_injector: PodInjector, namespace: str
) -> None:
    """`kubectl rollout restart` while Bento pods are created (server-side dry runs):
    each old replica fails /readyz at once and keeps answering for
    server.shutdownDelaySeconds, the endpoints move to the new ones."""
    assert isinstance(cluster, ControlPlane)
    with PodLoad(Api(cluster), namespace, dry_run=True) as load:
        load.wait_more(40)
        before = len(load.results)
        pods_injector.restart()
        during = len(load.results) - before
        load.wait_more(40)
        new_pods = reviews_by_replica(pods_injector)
    failed = load.failures
    print(
        f"rollout: {len(failed)} of {len(load.results)} creations failed "
        f"({during} during the rollout); reviews per new replica: {new_pods}"
    )
    assert failed == [], failed[:3]
    assert during > 0
    # The apiserver spreads its calls over the endpoints (WebhookRoundTripLoadBalancing).
    assert len(new_pods) == 2
    assert all(count > 0 for count in new_pods.values()), new_pods
