"""The node agent's RBAC and fences on a real kube-apiserver.

The ClusterRole and the bento-juicefs-node-agent-fence and
bento-juicefs-node-agent-pods-fence ValidatingAdmissionPolicies are the ones
in manifests/base, applied by the injector's install (devcluster/installs/injector_process.py;
the DaemonSet itself is left out there, the local cluster runs its own copy).
The tenants' side, bento-juicefs-models-ready-fence, is type-checked here and
exercised in tests/e2e/test_rbac.py. The agent's writes are made from the
admin kubeconfig impersonating its service account, with or without the
`authentication.kubernetes.io/node-name` extra a pod-bound token carries, on
Nodes registered in the API only (no kubelet behind them, tainted so that
nothing lands there) and on pods bound to them (which never run): only this
test touches them. One test takes a real TokenRequest token bound to a pod
on such a node, to show the extra is there.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.warm import STARTUP_TAINT, WARM_ANNOTATION, warm_label_key
from devcluster import Cluster, ControlPlane, wait_for

NAMESPACE = "bento-juicefs-system"
SERVICE_ACCOUNT = "bento-juicefs-node-agent"
AGENT = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POLICY = "bento-juicefs-node-agent-fence"
PODS_POLICY = "bento-juicefs-node-agent-pods-fence"
# The tenants' side of the same condition: no service account of the pod's namespace.
MODELS_READY_POLICY = "bento-juicefs-models-ready-fence"
CONDITION = "juicefs.bentoml.com/models-ready"
AGENT_VOLUME = {"name": "juicefs-agent", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
BASE = Path(__file__).resolve().parents[2] / "manifests" / "base"
SSD = "cloud.google.com/gke-ephemeral-storage-local-ssd"
FAKE_TAINT = {"key": "e2e.bento-juicefs/fake-node", "value": "true", "effect": "NoSchedule"}
WARM = warm_label_key("llama3-service", "v1")

OTHER_NODE = "the node agent may change only the node its pod runs on"
ONLY_WARM_LABELS = "the node agent may change only labels under warm.juicefs.bentoml.com/"
ONLY_OUR_ANNOTATION = (
    "the node agent may change only the juicefs.bentoml.com/warm-models annotation"
)
NO_OTHER_FIELD = "the node agent may change only its warm labels and annotation, and remove the"
ONLY_STARTUP_TAINT = (
    f"the node agent may only remove the startup taint {STARTUP_TAINT} from its node's taints"
)
STARTUP = {"key": STARTUP_TAINT, "value": "true", "effect": "NoSchedule"}
POD_ON_OTHER_NODE = (
    "the node agent may set the readiness condition only of pods on the node its own pod runs on"
)
NOT_SERVED = "has no juicefs-agent volume: the node agent sets the readiness condition only of"
ONLY_OUR_CONDITION = (
    "the node agent may change only the juicefs.bentoml.com/models-ready condition, "
    "no other condition"
)
NO_OTHER_POD_FIELD = (
    "the node agent may change only the juicefs.bentoml.com/models-ready condition, "
    "no other status field, label, annotation or finalizer"
)


def require_policy(cluster: Cluster, name: str) -> None:
    found = cluster.kubectl("get", "validatingadmissionpolicy", name, check=False)
    if found.returncode != 0:
        if isinstance(cluster, ControlPlane):  # the local cluster always installs it
            pytest.fail(f"{name} is not installed: {found.stderr}")
        pytest.skip(f"{name} is not installed in this cluster (manifests/base)")


@pytest.fixture
def fence(cluster: Cluster) -> None:
    require_policy(cluster, POLICY)


@dataclass
class FakeNodes:
    own: str
    other: str


@pytest.fixture
def nodes(cluster: Cluster, fence: None) -> Iterator[FakeNodes]:
    suffix = uuid.uuid4().hex[:6]
    found = FakeNodes(own=f"agent-fence-{suffix}-own", other=f"agent-fence-{suffix}-other")
    for name in (found.own, found.other):
        cluster.register_fake_node(name, labels={SSD: "true"})
        taint = {"spec": {"taints": [FAKE_TAINT]}}
        cluster.kubectl("patch", "node", name, "--type=merge", "-p", json.dumps(taint))
    yield found
    cluster.kubectl("delete", "node", found.own, found.other, "--wait=false", check=False)


def as_agent(cluster: Cluster, *args: str, node: str | None) -> subprocess.CompletedProcess[str]:
    """kubectl as the agent's service account; `node`: the token's node-name extra (None: none)."""
    extra = [f"--as-user-extra={NODE_NAME_EXTRA}={node}"] if node is not None else []
    return cluster.kubectl(f"--as={AGENT}", *extra, *args, check=False)


def patch_node(
    cluster: Cluster, name: str, patch: dict[str, Any], node: str | None
) -> subprocess.CompletedProcess[str]:
    return as_agent(
        cluster, "patch", "node", name, "--type=merge", "-p", json.dumps(patch), node=node
    )


def get_node(cluster: Cluster, name: str) -> dict[str, Any]:
    found: dict[str, Any] = cluster.get_json("node", name)
    return found


def assert_denied(
    proc: subprocess.CompletedProcess[str], message: str, what: str, policy: str = POLICY
) -> None:
    assert proc.returncode != 0, f"{what} was allowed"
    assert f"ValidatingAdmissionPolicy '{policy}'" in proc.stderr, (what, proc.stderr)
    assert message in proc.stderr, (what, proc.stderr)
    print(f"denied, {what}: {proc.stderr.strip()}")


def test_the_agent_records_warm_models_on_its_own_node(cluster: Cluster, nodes: FakeNodes) -> None:
    own = nodes.own
    record = '[{"bento":"llama3-service:v1","state":"warm","volume":"models"}]'

    label = as_agent(cluster, "label", "node", own, f"{WARM}=models", node=own)
    assert label.returncode == 0, label.stderr
    annotate = as_agent(cluster, "annotate", "node", own, f"{WARM_ANNOTATION}={record}", node=own)
    assert annotate.returncode == 0, annotate.stderr
    after = get_node(cluster, own)["metadata"]
    assert after["labels"][WARM] == "models"
    assert after["annotations"][WARM_ANNOTATION] == record

    # Both in one patch, as the agent writes them: one label off, another on.
    other_warm = warm_label_key("mistral-service", "v2")
    both = {
        "metadata": {
            "labels": {WARM: None, other_warm: "models"},
            "annotations": {WARM_ANNOTATION: "[]"},
        }
    }
    patched = patch_node(cluster, own, both, node=own)
    assert patched.returncode == 0, patched.stderr
    after = get_node(cluster, own)["metadata"]
    assert WARM not in after["labels"]
    assert after["labels"][other_warm] == "models"
    assert after["labels"][SSD] == "true"
    assert after["annotations"][WARM_ANNOTATION] == "[]"

    removed = as_agent(cluster, "label", "node", own, f"{other_warm}-", node=own)
    assert removed.returncode == 0, removed.stderr
    assert not any(k.startswith("warm.") for k in get_node(cluster, own)["metadata"]["labels"])


def test_the_fence_keeps_the_agent_to_its_node_and_its_keys(
    cluster: Cluster, nodes: FakeNodes
) -> None:
    own, other = nodes.own, nodes.other
    warm = {"metadata": {"labels": {WARM: "models"}}}
    before = {name: get_node(cluster, name) for name in (own, other)}
    denials = {
        "another node": (
            patch_node(cluster, other, warm, node=own),
            f"node {other}: {OTHER_NODE} (this token is bound to a pod on node {own})",
        ),
        "a token without a node": (
            patch_node(cluster, own, warm, node=None),
            f"node {own}: {OTHER_NODE} (this token names no node",
        ),
        "the SSD label": (
            patch_node(cluster, own, {"metadata": {"labels": {SSD: "false"}}}, node=own),
            ONLY_WARM_LABELS,
        ),
        "a new label, next to a warm one": (
            patch_node(
                cluster, own, {"metadata": {"labels": {WARM: "models", "hijacked": "1"}}}, node=own
            ),
            ONLY_WARM_LABELS,
        ),
        "a label removed": (
            patch_node(
                cluster, own, {"metadata": {"labels": {"kubernetes.io/hostname": None}}}, node=own
            ),
            ONLY_WARM_LABELS,
        ),
        "another annotation": (
            patch_node(
                cluster, own, {"metadata": {"annotations": {"example.com/note": "x"}}}, node=own
            ),
            ONLY_OUR_ANNOTATION,
        ),
        "spec.unschedulable": (
            patch_node(cluster, own, {"spec": {"unschedulable": True}}, node=own),
            NO_OTHER_FIELD,
        ),
        "the taints": (
            patch_node(cluster, own, {"spec": {"taints": []}}, node=own),
            ONLY_STARTUP_TAINT,
        ),
        "the startup taint added": (
            patch_node(cluster, own, {"spec": {"taints": [FAKE_TAINT, STARTUP]}}, node=own),
            ONLY_STARTUP_TAINT,
        ),
        "a finalizer": (
            patch_node(cluster, own, {"metadata": {"finalizers": ["example.com/hold"]}}, node=own),
            NO_OTHER_FIELD,
        ),
    }
    for what, (proc, message) in denials.items():
        assert_denied(proc, message, what)
    for name, node in before.items():
        now = get_node(cluster, name)
        for part in ("labels", "annotations", "finalizers"):
            assert now["metadata"].get(part) == node["metadata"].get(part), (name, part)
        assert now["spec"] == node["spec"], name


def test_the_agent_may_remove_the_startup_taint_of_its_own_node_only(
    cluster: Cluster, nodes: FakeNodes
) -> None:
    own, other = nodes.own, nodes.other
    both = {"spec": {"taints": [FAKE_TAINT, STARTUP]}}
    for name in (own, other):
        cluster.kubectl("patch", "node", name, "--type=merge", "-p", json.dumps(both))
    without = {"spec": {"taints": [FAKE_TAINT]}}
    assert_denied(
        patch_node(cluster, other, without, node=own), OTHER_NODE, "another node's startup taint"
    )
    assert_denied(
        patch_node(cluster, own, {"spec": {"taints": [STARTUP]}}, node=own),
        ONLY_STARTUP_TAINT,
        "another taint removed with it",
    )
    removed = patch_node(cluster, own, without, node=own)
    assert removed.returncode == 0, removed.stderr
    assert get_node(cluster, own)["spec"]["taints"] == [FAKE_TAINT]
    assert get_node(cluster, other)["spec"]["taints"] == [FAKE_TAINT, STARTUP]


def can_i(cluster: Cluster, *args: str) -> bool:
    proc = cluster.kubectl("auth", "can-i", f"--as={AGENT}", *args, check=False)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), (args, proc.stdout, proc.stderr)
    return answer == "yes"


def test_the_agent_role_grants_what_it_needs_and_no_more(cluster: Cluster, fence: None) -> None:
    granted = [
        ("get", "namespaces"),
        ("watch", "namespaces"),
        ("list", "deployments.apps", "-A"),
        ("watch", "statefulsets.apps", "-A"),
        ("get", "nodes"),
        ("watch", "nodes"),
        ("patch", "nodes"),
        ("create", "events", "-n", "default"),
        ("patch", "events", "-n", "default"),
        ("create", "events.events.k8s.io", "-n", "default"),
        # The pods on its node it mounts for, their condition and their Events.
        ("list", "pods", "-A"),
        ("watch", "pods", "-A"),
        ("get", "pods", "-n", "kube-system"),
        ("patch", "pods", "--subresource=status", "-A"),
        ("create", "events", "-n", "kube-system"),
        ("create", "events.events.k8s.io", "-n", NAMESPACE),
    ]
    refused = [
        ("get", "secrets", "-n", NAMESPACE),
        ("list", "secrets", "-A"),
        ("get", "secrets", "-A"),
        ("watch", "secrets", "-A"),
        ("patch", "nodes", "--subresource=status"),
        ("update", "nodes", "--subresource=status"),
        ("update", "nodes"),
        ("create", "nodes"),
        ("delete", "nodes"),
        ("patch", "namespaces"),
        ("patch", "deployments.apps", "-A"),
        ("create", "pods", "-A"),
        ("patch", "pods", "-A"),
        ("update", "pods", "-A"),
        ("delete", "pods", "-A"),
        ("create", "pods/exec", "-A"),
        ("update", "pods", "--subresource=status", "-A"),
        ("get", "pods", "--subresource=log", "-A"),
        ("delete", "events", "-A"),
    ]
    assert [a for a in granted if not can_i(cluster, *a)] == []
    assert [a for a in refused if can_i(cluster, *a)] == []


def test_a_token_bound_to_the_agents_pod_names_its_node(
    cluster: Cluster, nodes: FakeNodes, tmp_path: Path
) -> None:
    """What the fence reads is really there: TokenRequest for a pod on the node."""
    pod_name = f"agent-token-{uuid.uuid4().hex[:6]}"
    # Bound to the fake node, so it never runs; restricted-clean whatever the namespace enforces.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": NAMESPACE},
        "spec": {
            "nodeName": nodes.own,
            "serviceAccountName": SERVICE_ACCOUNT,
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "main",
                    "image": "registry.invalid/never-pulled:1",
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    cluster.apply(pod)
    try:
        uid = cluster.get_json("pod", pod_name, "-n", NAMESPACE)["metadata"]["uid"]
        token = cluster.kubectl(
            "create", "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--bound-object-kind", "Pod",
            "--bound-object-name", pod_name, "--bound-object-uid", uid, "--duration=10m",
        ).stdout.strip()  # fmt: skip
        agent = TokenKubectl(cluster, token, tmp_path)

        whoami = json.loads(agent.run("auth", "whoami", "-o", "json").stdout)
        user = whoami["status"]["userInfo"]
        assert user["username"] == AGENT
        assert user["extra"][NODE_NAME_EXTRA] == [nodes.own], user
        print(f"the pod-bound token's extra: {json.dumps(user['extra'], sort_keys=True)}")

        warm = json.dumps({"metadata": {"labels": {WARM: "models"}}})
        allowed = agent.run("patch", "node", nodes.own, "--type=merge", "-p", warm)
        assert allowed.returncode == 0, allowed.stderr
        assert get_node(cluster, nodes.own)["metadata"]["labels"][WARM] == "models"
        denied = agent.run("patch", "node", nodes.other, "--type=merge", "-p", warm)
        assert_denied(denied, f"(this token is bound to a pod on node {nodes.own})", "another node")
    finally:
        cluster.kubectl(
            "delete", "pod", pod_name, "-n", NAMESPACE, "--grace-period=0", "--force",
            "--wait=false", check=False,
        )  # fmt: skip


class TokenKubectl:
    """kubectl with a bearer token alone (with the admin kubeconfig, its client cert would win)."""

    def __init__(self, cluster: Cluster, token: str, work: Path) -> None:
        self.cluster = cluster
        self.token = token
        config = json.loads(
            cluster.kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout
        )
        details = config["clusters"][0]["cluster"]
        self.config = work / "token.kubeconfig"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": details}],
                    "users": [{"name": "u", "user": {"token": token}}],
                    "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "c",
                }
            )
        )
        self.config.chmod(0o600)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.cluster.kubectl_path, f"--kubeconfig={self.config}", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


def test_the_node_agent_manifests_pass_the_apiserver(cluster: Cluster, fence: None) -> None:
    """The shipped DaemonSet and its pod, as a dry run on the server (the local cluster runs
    its own copy, with the local node's paths: devcluster/installs/node_agent.py).

    Schema, defaults and the namespace's Pod Security level: a privileged pod
    with a hostPath, admitted in bento-juicefs-system.
    """
    rendered = cluster.kubectl("kustomize", str(BASE)).stdout
    (daemonset,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "DaemonSet"]
    applied = cluster.kubectl(
        "apply", "--dry-run=server", "-f", "-", "-o", "json", input=json.dumps(daemonset)
    )
    assert "PodSecurity" not in applied.stderr, applied.stderr
    spec = json.loads(applied.stdout)["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == SERVICE_ACCOUNT
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "node-agent-dry-run", "namespace": NAMESPACE},
        "spec": daemonset["spec"]["template"]["spec"],
    }
    created = cluster.kubectl(
        "create", "--dry-run=server", "-f", "-", "-o", "json", input=json.dumps(pod), check=False
    )
    assert created.returncode == 0, created.stderr
    container = json.loads(created.stdout)["spec"]["containers"][0]
    assert container["securityContext"]["privileged"] is True


@pytest.mark.parametrize("name", [POLICY, PODS_POLICY, MODELS_READY_POLICY])
def test_the_fence_type_checks_cleanly(cluster: Cluster, name: str) -> None:
    """The apiserver's type check of every expression against the Node or Pod schema: no
    warnings."""
    require_policy(cluster, name)

    def checked() -> dict[str, Any] | None:
        policy: dict[str, Any] = cluster.get_json("validatingadmissionpolicy", name)
        status = policy.get("status") or {}
        done = status.get("observedGeneration") == policy["metadata"]["generation"]
        return status if done else None

    status = wait_for(checked, timeout=30, what=f"{name} to be type-checked")
    assert not (status.get("typeChecking") or {}).get("expressionWarnings"), status
    print(f"{name} status: {json.dumps(status, sort_keys=True)}")


# -- the pods fence -----------------------------------------------------------------------


@dataclass
class FencePods:
    namespace: str
    served: str  # on the agent's node, with the agent volume: the agent's to set
    elsewhere: str  # on the other node, with the agent volume
    plain: str  # on the agent's node, without it (no pod the agent serves)


@pytest.fixture
def pods(cluster: Cluster, nodes: FakeNodes) -> Iterator[FencePods]:
    """Pods bound to the fake nodes (never run), in a namespace of their own.

    Not opted in, not Bentos: the agent's fence is cluster-wide and the
    injector leaves them alone.
    """
    require_policy(cluster, PODS_POLICY)
    suffix = uuid.uuid4().hex[:6]
    found = FencePods(f"agent-pods-fence-{suffix}", "served", "elsewhere", "plain")
    cluster.create_namespace(found.namespace)
    for name, node, volumes in (
        (found.served, nodes.own, [AGENT_VOLUME]),
        (found.elsewhere, nodes.other, [AGENT_VOLUME]),
        (found.plain, nodes.own, []),
    ):
        cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": found.namespace},
                "spec": {
                    "nodeName": node,
                    "automountServiceAccountToken": False,
                    "tolerations": [{"operator": "Exists"}],
                    "securityContext": {
                        "runAsNonRoot": True,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "main",
                            "image": "registry.invalid/never-pulled:1",
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                    "volumes": volumes,
                },
            }
        )
    yield found
    # No kubelet confirms their deletion: force it, then the namespace goes.
    cluster.kubectl(
        "delete", "pods", "--all", "-n", found.namespace, "--grace-period=0", "--force",
        "--wait=false", check=False,
    )  # fmt: skip
    cluster.kubectl("delete", "namespace", found.namespace, "--wait=false", check=False)


def patch_pod_status(
    cluster: Cluster, pods: FencePods, name: str, patch: dict[str, Any], node: str | None
) -> subprocess.CompletedProcess[str]:
    """A strategic merge patch of pods/status as the agent writes it (nodeagent/kube.py)."""
    return as_agent(
        cluster, "patch", "pod", name, "-n", pods.namespace, "--subresource=status",
        "--type=strategic", "-p", json.dumps(patch), node=node,
    )  # fmt: skip


def condition_patch(kind: str = CONDITION, status: str = "True") -> dict[str, Any]:
    return {
        "status": {
            "conditions": [
                {"type": kind, "status": status, "reason": "Test", "message": "set by the agent"}
            ]
        }
    }


def pod_condition(cluster: Cluster, pods: FencePods, name: str, kind: str) -> str | None:
    pod = cluster.get_json("pod", name, "-n", pods.namespace)
    for found in pod.get("status", {}).get("conditions") or []:
        if found["type"] == kind:
            return str(found["status"])
    return None


def test_the_agent_sets_the_condition_of_a_served_pod_on_its_node(
    cluster: Cluster, nodes: FakeNodes, pods: FencePods
) -> None:
    for status in ("False", "True", "False"):
        patched = patch_pod_status(
            cluster, pods, pods.served, condition_patch(status=status), node=nodes.own
        )
        assert patched.returncode == 0, patched.stderr
        assert pod_condition(cluster, pods, pods.served, CONDITION) == status


def test_the_pods_fence_keeps_the_agent_to_its_nodes_served_pods_and_one_condition(
    cluster: Cluster, nodes: FakeNodes, pods: FencePods
) -> None:
    own, other, ns = nodes.own, nodes.other, pods.namespace
    ready = condition_patch()
    denials = {
        "a pod on another node": (
            patch_pod_status(cluster, pods, pods.elsewhere, ready, node=own),
            f"pod {ns}/{pods.elsewhere}: {POD_ON_OTHER_NODE} (this pod is on node {other}; "
            f"this token is bound to a pod on node {own})",
        ),
        "a token without a node": (
            patch_pod_status(cluster, pods, pods.served, ready, node=None),
            f"pod {ns}/{pods.served}: {POD_ON_OTHER_NODE} (this pod is on node {own}; "
            "this token names no node",
        ),
        "a pod without the agent volume": (
            patch_pod_status(cluster, pods, pods.plain, ready, node=own),
            f"pod {ns}/{pods.plain} {NOT_SERVED}",
        ),
        "another condition type": (
            patch_pod_status(
                cluster, pods, pods.served, condition_patch("example.com/other"), node=own
            ),
            ONLY_OUR_CONDITION,
        ),
        "the PodScheduled condition": (
            patch_pod_status(
                cluster, pods, pods.served, condition_patch("PodScheduled", "False"), node=own
            ),
            ONLY_OUR_CONDITION,
        ),
        "another status field": (
            patch_pod_status(cluster, pods, pods.served, {"status": {"message": "x"}}, node=own),
            NO_OTHER_POD_FIELD,
        ),
        "a label through pods/status": (
            patch_pod_status(
                cluster, pods, pods.served, {"metadata": {"labels": {"hijacked": "1"}}}, node=own
            ),
            NO_OTHER_POD_FIELD,
        ),
        "an annotation through pods/status": (
            patch_pod_status(
                cluster,
                pods,
                pods.served,
                {"metadata": {"annotations": {"example.com/note": "x"}}},
                node=own,
            ),
            NO_OTHER_POD_FIELD,
        ),
    }
    for what, (proc, message) in denials.items():
        assert_denied(proc, message, what, policy=PODS_POLICY)
    for name in (pods.served, pods.elsewhere, pods.plain):
        assert pod_condition(cluster, pods, name, CONDITION) is None, name
        assert pod_condition(cluster, pods, name, "example.com/other") is None, name
    served = cluster.get_json("pod", pods.served, "-n", ns)
    assert "hijacked" not in (served["metadata"].get("labels") or {})
    assert "example.com/note" not in (served["metadata"].get("annotations") or {})
    assert "message" not in served["status"]
    # The pod itself stays out of reach: RBAC, before any policy.
    spec = as_agent(cluster, "label", "pod", pods.served, "-n", ns, "hijacked=1", node=own)
    assert spec.returncode != 0
    assert 'cannot patch resource "pods"' in spec.stderr, spec.stderr
