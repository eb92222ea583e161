"""The admission path end to end on a real kube-apiserver.

The chart (or the gke overlay) installed as users install it: the injector's
two replicas run as pods on the real node and patched the caBundle
themselves (devcluster/installs/injector_pods.py; BENTO_INJECTOR_INSTALL=process runs
it as a local process instead, devcluster/installs/injector_process.py).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from devcluster import Cluster, wait_for
from devcluster.installs.injector_install import InjectorInstall
from tests.e2e.pods import NOWHERE, bento_labels, bento_pod, get_pod, kubectl_create, placed
from tests.e2e.webhooks import TestWebhook, running_test_webhook
from tests.helpers import GOLDEN_DIR

OPT_IN = {"juicefs.bentoml.com/injection": "enabled"}
SSD = "cloud.google.com/gke-ephemeral-storage-local-ssd"
STATUS = "juicefs.bentoml.com/status"
GATE = "juicefs.bentoml.com/models-ready"
IMAGE = "us-docker.pkg.dev/acme/bentos/llama3:v1"

NewNamespace = Callable[..., str]


@pytest.fixture
def new_namespace(cluster: Cluster) -> Iterator[NewNamespace]:
    created: list[str] = []

    def make(opted_in: bool = True) -> str:
        name = f"e2e-{uuid.uuid4().hex[:6]}"
        cluster.create_namespace(name, OPT_IN if opted_in else {})
        created.append(name)
        return name

    yield make
    for name in created:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def plain_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "main", "image": "nginx"}]},
    }


def helm_deployment(name: str, pod_labels: dict[str, str]) -> dict[str, Any]:
    """What a Helm chart renders for a Bento, unchanged."""
    selector = {"app.kubernetes.io/name": name, "app.kubernetes.io/instance": "prod"}
    probe = {"httpGet": {"path": "/readyz", "port": 3000}, "periodSeconds": 5}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"helm.sh/chart": f"{name}-0.3.1", **selector}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**selector, **pod_labels}},
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": IMAGE,
                            "ports": [{"containerPort": 3000, "name": "http"}],
                            "readinessProbe": probe,
                            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
                        }
                    ]
                },
            },
        },
    }


def assert_injected(pod: dict[str, Any]) -> None:
    spec = pod["spec"]
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == "juicefs-mount"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert "privileged" not in sidecar["securityContext"]
    # The node cache by default (gke profile): an emptyDir only the sidecar mounts,
    # onto which the node agent binds the cache; no ephemeral-storage request (the
    # node budget bounds it). No volume of ours is a host path.
    cache = next(v for v in spec["volumes"] if v["name"] == "juicefs-cache")
    assert "hostPath" not in cache
    assert "ephemeral-storage" not in sidecar["resources"]["requests"]
    ours = {v["name"]: v for v in spec["volumes"] if v["name"].startswith("juicefs-")}
    assert set(ours) == {"juicefs-mount-dir", "juicefs-cache", "juicefs-agent"}
    assert all("emptyDir" in v for v in ours.values())
    assert {"conditionType": GATE} in spec["readinessGates"]
    assert STATUS in pod["metadata"]["annotations"]
    app_mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert app_mounts["juicefs-mount-dir"]["mountPropagation"] == "HostToContainer"
    assert app_mounts["juicefs-mount-dir"]["readOnly"] is True
    # The ServiceAccount plugin put a token into the app, not into the sidecar: an
    # empty directory of the agent volume covers its path there.
    token = "/var/run/secrets/kubernetes.io/serviceaccount"
    (at_token,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == token]
    assert (at_token["name"], at_token.get("subPath")) == ("juicefs-agent", "no-token")
    required = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    for term in required["nodeSelectorTerms"]:
        assert {"key": SSD, "operator": "In", "values": ["true"]} in term["matchExpressions"]


def test_ca_bundle_is_the_injectors_own_ca(cluster: Cluster, injector: InjectorInstall) -> None:
    config = cluster.get_json("mutatingwebhookconfiguration", "bento-juicefs-injector")
    bundle = base64.b64decode(config["webhooks"][0]["clientConfig"]["caBundle"])
    secret = cluster.get_json("secret", "bento-juicefs-injector-ca", "-n", "bento-juicefs-system")
    assert bundle == base64.b64decode(secret["data"]["ca.crt"])
    assert bundle == injector.ca_certificate()
    # What each replica serves is issued by it, for the name the webhook calls.
    served = injector.serving_certificates()
    assert served
    assert len(served) == len(injector.endpoints())
    ca = x509.load_pem_x509_certificate(bundle)
    for der in served:
        x509.load_der_x509_certificate(der).verify_directly_issued_by(ca)


def test_unlabelled_namespace_pods_stored_untouched(
    cluster: Cluster, new_namespace: NewNamespace
) -> None:
    namespace = new_namespace(opted_in=False)
    kubectl_create(cluster, namespace, bento_pod("llama"), "-o", "name")
    pod = get_pod(cluster, namespace, "llama")
    assert "initContainers" not in pod["spec"]
    assert STATUS not in (pod["metadata"].get("annotations") or {})


def test_helm_deployment_pods_are_injected_and_others_untouched(
    cluster: Cluster, new_namespace: NewNamespace
) -> None:
    namespace = new_namespace()
    bento = helm_deployment("llama", bento_labels("llama3-service", "v1"))
    # Admission is what is checked here: the pods of this unpublished Bento stay off
    # every node, so no node agent starts their seal (and records a failed warm).
    bento["spec"]["template"]["spec"]["nodeSelector"] = NOWHERE
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bento))
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(helm_deployment("redis", {}))
    )

    def pods(app: str) -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = cluster.get_json(
            "pods", "-n", namespace, "-l", f"app.kubernetes.io/name={app}"
        )["items"]
        return items if len(items) == 2 else None

    for pod in wait_for(lambda: pods("llama"), timeout=30, what="Bento pods"):
        assert_injected(pod)
    for pod in wait_for(lambda: pods("redis"), timeout=30, what="redis pods"):
        assert "initContainers" not in pod["spec"]
        assert STATUS not in (pod["metadata"].get("annotations") or {})


def test_scheduler_binds_only_to_ssd_nodes_with_room_for_the_cache(
    cluster: Cluster, new_namespace: NewNamespace
) -> None:
    suffix = uuid.uuid4().hex[:5]
    # Taint the fake nodes so only this test's pods (which tolerate it) land there.
    taint_key = f"e2e-{suffix}"
    nodes = {
        "ssd-big": {SSD: "true", "cloud.google.com/gke-image-streaming": "true"},
        "ssd-small": {SSD: "true"},
        "plain": {},
    }
    storage = {"ssd-big": "500Gi", "ssd-small": "10Gi", "plain": "500Gi"}
    for short, labels in nodes.items():
        name = f"{short}-{suffix}"
        cluster.register_fake_node(
            name, {**labels, "e2e-group": suffix}, ephemeral_storage=storage[short]
        )
        cluster.kubectl("taint", "node", name, f"{taint_key}=yes:NoSchedule")
    namespace = new_namespace()
    toleration = [{"key": taint_key, "operator": "Exists", "effect": "NoSchedule"}]
    group = {"key": "e2e-group", "operator": "In", "values": [suffix]}
    # The pod cache: each pod requests its size in ephemeral-storage.
    pod_cache = {"juicefs.bentoml.com/cache-mode": "pod"}
    for index, cache in enumerate(["20Gi", "20Gi", "20Gi", "200Gi"]):
        pod = placed(
            bento_pod(f"bento-{index}", **pod_cache, **{"juicefs.bentoml.com/cache-size": cache})
        )
        pod["spec"]["tolerations"] = toleration
        pod["spec"]["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [group]}]
                }
            }
        }
        assert kubectl_create(cluster, namespace, pod).returncode == 0

    def bound(name: str) -> str | None:
        node: str | None = get_pod(cluster, namespace, name)["spec"].get("nodeName")
        return node

    for index in range(3):
        name = f"bento-{index}"
        node = wait_for(lambda name=name: bound(name), timeout=30, what="binding")  # type: ignore[misc]
        assert node.startswith("ssd-"), f"bento-{index} was bound to {node}"
    # 200Gi of cache fits only ssd-big.
    assert wait_for(lambda: bound("bento-3"), timeout=30, what="binding") == f"ssd-big-{suffix}"
    # A pod too big for every SSD node is not bound at all, and says why.
    huge = placed(bento_pod("bento-huge", **pod_cache, **{"juicefs.bentoml.com/cache-size": "1Ti"}))
    huge["spec"]["tolerations"] = toleration
    huge["spec"]["affinity"] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [group]}]
            }
        }
    }
    kubectl_create(cluster, namespace, huge)

    def unschedulable() -> str | None:
        events = cluster.get_json(
            "events", "-n", namespace, "--field-selector", "involvedObject.name=bento-huge"
        )
        messages = [e["message"] for e in events["items"] if e["reason"] == "FailedScheduling"]
        return messages[0] if messages else None

    message = wait_for(unschedulable, timeout=30, what="FailedScheduling")
    assert "ephemeral-storage" in message
    assert bound("bento-huge") is None
    for short in nodes:
        cluster.kubectl("delete", "node", f"{short}-{suffix}", check=False)


def test_describe_shows_status_sidecar_gate_and_condition(
    cluster: Cluster, new_namespace: NewNamespace
) -> None:
    namespace = new_namespace()
    kubectl_create(cluster, namespace, bento_pod("llama"))
    condition = {
        "status": {"conditions": [{"type": GATE, "status": "True", "reason": "ModelsCached"}]}
    }
    cluster.kubectl(
        "patch",
        "pod",
        "llama",
        "-n",
        namespace,
        "--subresource=status",
        "--type=strategic",
        "-p",
        json.dumps(condition),
    )
    described = cluster.kubectl("describe", "pod", "llama", "-n", namespace).stdout
    assert "juicefs.bentoml.com/status:" in described
    assert "juicefs-mount:" in described
    assert "Readiness Gates:" in described
    gate_line = next(line for line in described.splitlines() if GATE in line and "True" in line)
    assert gate_line.split()[-1] == "True"


def test_server_side_dry_run_returns_injected_pod_and_stores_nothing(
    cluster: Cluster, new_namespace: NewNamespace
) -> None:
    namespace = new_namespace()
    result = kubectl_create(cluster, namespace, bento_pod("dry"), "--dry-run=server", "-o", "json")
    assert result.returncode == 0, result.stderr
    assert_injected(json.loads(result.stdout))
    missing = cluster.kubectl("get", "pod", "dry", "-n", namespace, check=False)
    assert missing.returncode != 0
    assert "NotFound" in missing.stderr


def test_injector_down_bento_denied_by_policy_others_created(
    cluster: Cluster, new_namespace: NewNamespace, injector: InjectorInstall
) -> None:
    namespace = new_namespace()
    injector.stop()
    try:
        injector.wait_unreachable()
        denied = kubectl_create(cluster, namespace, bento_pod("bento"))
        assert denied.returncode != 0
        assert "bento-juicefs-sidecar-required" in denied.stderr
        assert "the JuiceFS injector did not run" in denied.stderr
        assert kubectl_create(cluster, namespace, plain_pod("plain")).returncode == 0
    finally:
        injector.start()
    assert kubectl_create(cluster, namespace, bento_pod("bento")).returncode == 0


@pytest.fixture
def test_webhook(
    cluster: Cluster, tmp_path: Path, injector: InjectorInstall
) -> Iterator[TestWebhook]:
    with running_test_webhook(cluster, tmp_path) as hook:
        yield hook


def test_webhook_that_strips_restart_policy_gets_the_pod_denied(
    cluster: Cluster, new_namespace: NewNamespace, test_webhook: TestWebhook
) -> None:
    namespace = new_namespace()
    test_webhook.mode = "strip-restart-policy"
    result = kubectl_create(cluster, namespace, bento_pod("stripped"))
    assert result.returncode != 0
    assert "restartPolicy: Always" in result.stderr
    assert "webhook" in result.stderr


def test_webhook_that_adds_a_container_reinvokes_us(
    cluster: Cluster, new_namespace: NewNamespace, test_webhook: TestWebhook
) -> None:
    namespace = new_namespace()
    test_webhook.mode = "add-container"
    assert kubectl_create(cluster, namespace, bento_pod("reinvoked")).returncode == 0
    pod = get_pod(cluster, namespace, "reinvoked")
    names = [c["name"] for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]]
    assert names.count("juicefs-mount") == 1
    added = next(c for c in pod["spec"]["containers"] if c["name"] == "added-later")
    assert any(m["name"] == "juicefs-mount-dir" for m in added["volumeMounts"])


def _golden_outputs() -> list[Path]:
    return [
        p
        for p in sorted(GOLDEN_DIR.glob("*.injected"))
        if not p.read_text().startswith("# denied:")
    ]


def test_every_golden_output_passes_server_side_validation(cluster: Cluster) -> None:
    """Server-side dry-run in unlabelled namespaces: the real schema validates our output."""
    failures = []
    for golden in _golden_outputs():
        documents = [d for d in yaml.safe_load_all(golden.read_text()) if d]
        for doc in documents:
            namespace = (doc.get("metadata") or {}).get("namespace") or "default"
            if cluster.kubectl("get", "namespace", namespace, check=False).returncode != 0:
                cluster.create_namespace(namespace)
            account = _service_account(doc)
            if account:
                cluster.kubectl("create", "serviceaccount", account, "-n", namespace, check=False)
            result = cluster.kubectl(
                "create",
                "--dry-run=server",
                "-n",
                namespace,
                "-f",
                "-",
                input=json.dumps(doc),
                check=False,
            )
            if result.returncode != 0:
                failures.append(f"{golden.name}: {result.stderr.strip()}")
    assert not failures, "\n".join(failures)


def _service_account(doc: dict[str, Any]) -> str | None:
    spec = doc.get("spec") or {}
    for path in (("template", "spec"), ("jobTemplate", "spec", "template", "spec"), ()):
        node: Any = spec
        for key in path:
            node = (node or {}).get(key)
        if isinstance(node, dict) and node.get("serviceAccountName"):
            return str(node["serviceAccountName"])
    return None


def test_namespace_controller_follows_the_label(
    cluster: Cluster, new_namespace: NewNamespace
) -> None:
    namespace = new_namespace(opted_in=False)

    def objects() -> set[str]:
        names: set[str] = set()
        for kind in ("secret", "rolebinding"):
            items = cluster.get_json(
                kind, "-n", namespace, "-l", "app.kubernetes.io/managed-by=bento-juicefs-injector"
            )["items"]
            names.update(f"{kind}/{item['metadata']['name']}" for item in items)
        return names

    # The credentials, and no RBAC: the node agent sets the pods' condition.
    expected = {"secret/juicefs-models-credentials"}
    assert objects() == set()
    cluster.kubectl("label", "namespace", namespace, "juicefs.bentoml.com/injection=enabled")
    wait_for(lambda: objects() == expected, timeout=30, what="the credentials copy")
    source = cluster.get_json("secret", "juicefs-models-credentials", "-n", "bento-juicefs-system")
    copy = cluster.get_json("secret", "juicefs-models-credentials", "-n", namespace)
    assert copy["data"] == source["data"]

    def recorded() -> str | None:
        annotations = cluster.get_json("namespace", namespace)["metadata"].get("annotations")
        return (annotations or {}).get("juicefs.bentoml.com/provisioned")

    found = wait_for(recorded, timeout=30, what="the provisioned record")
    assert found == "secret/juicefs-models-credentials"
    cluster.kubectl("label", "namespace", namespace, "juicefs.bentoml.com/injection-")
    wait_for(lambda: objects() == set(), timeout=30, what="cleanup")


def test_namespace_controller_leaves_a_tenants_own_secret_alone(
    cluster: Cluster, injector: InjectorInstall, new_namespace: NewNamespace
) -> None:
    namespace = new_namespace(opted_in=False)
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "juicefs-models-credentials",
        "-n",
        namespace,
        "--from-literal=metaurl=theirs",
    )
    cluster.kubectl("label", "namespace", namespace, "juicefs.bentoml.com/injection=enabled")

    def refused() -> bool:
        """The controller saw the namespace, and left the Secret as someone else's."""
        return any(
            "namespace.not_ours" in line and namespace in line
            for line in injector.logs().splitlines()
        )

    wait_for(refused, timeout=30, what="the controller's namespace.not_ours")
    secret = cluster.get_json("secret", "juicefs-models-credentials", "-n", namespace)
    assert base64.b64decode(secret["data"]["metaurl"]) == b"theirs"
    annotations = cluster.get_json("namespace", namespace)["metadata"].get("annotations") or {}
    assert "juicefs.bentoml.com/provisioned" not in annotations  # nothing of ours to remove
    cluster.kubectl("label", "namespace", namespace, "juicefs.bentoml.com/injection-")
    for _ in range(10):  # the watch reacts within a second; the Secret stays
        kept = cluster.kubectl(
            "get", "secret", "juicefs-models-credentials", "-n", namespace, check=False
        )
        assert kept.returncode == 0
        time.sleep(0.5)


def test_reset_ca_bundle_is_healed(cluster: Cluster, injector: InjectorInstall) -> None:
    """A chart upgrade or GitOps sync that blanks the caBundle is repaired without a restart."""
    reset = [{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle", "value": ""}]
    cluster.kubectl(
        "patch",
        "mutatingwebhookconfiguration",
        "bento-juicefs-injector",
        "--type=json",
        "-p",
        json.dumps(reset),
    )
    expected = base64.b64encode(injector.ca_certificate()).decode()

    def healed() -> bool:
        config = cluster.get_json("mutatingwebhookconfiguration", "bento-juicefs-injector")
        return bool(config["webhooks"][0]["clientConfig"].get("caBundle") == expected)

    wait_for(healed, timeout=20, what="caBundle re-patched")
    wait_for(injector.ready, timeout=20, what="/readyz")
