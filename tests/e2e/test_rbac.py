"""Least privilege on a real apiserver: each identity holds exactly its documented rows.

For the injector, the node agent and the workloads of an opted-in namespace,
the rules the apiserver reports for them (a SelfSubjectRulesReview as that
service account, which is what `kubectl auth can-i --list` prints), minus
what every service account holds (those of a fresh one), must be the rows
of docs/security.md's tables (and node-agent.md's), in their own namespace,
in a tenant namespace and in `default`. Then `kubectl auth can-i` for
things outside the rows, and the injector's and the workloads' fences,
impersonated.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

from devcluster import Cluster, wait_for
from tests.rbac_docs import Atom, documented, expected

SYSTEM = "bento-juicefs-system"
INJECTOR = f"system:serviceaccount:{SYSTEM}:bento-juicefs-injector"
AGENT = f"system:serviceaccount:{SYSTEM}:bento-juicefs-node-agent"
OPT_IN = {"juicefs.bentoml.com/injection": "enabled"}
PROVISIONED = "juicefs.bentoml.com/provisioned"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
GATE = "juicefs.bentoml.com/models-ready"


class Rules(NamedTuple):
    resource: set[Atom]
    non_resource: set[tuple[str, str]]


def rules(cluster: Cluster, user: str, namespace: str) -> Rules:
    """What the apiserver says user may do in namespace (SelfSubjectRulesReview, as user)."""
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": namespace},
    }
    out = cluster.kubectl(
        "create",
        "--validate=false",
        "-f",
        "-",
        "-o",
        "json",
        f"--as={user}",
        input=json.dumps(review),
        check=False,
    )
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)["status"]
    resource = {
        Atom(group, res, verb, name)
        for rule in status.get("resourceRules") or []
        for group in rule.get("apiGroups") or [""]
        for res in rule.get("resources") or []
        for verb in rule["verbs"]
        for name in rule.get("resourceNames") or ["*"]
    }
    non_resource = {
        (url, verb)
        for rule in status.get("nonResourceRules") or []
        for url in rule["nonResourceURLs"]
        for verb in rule["verbs"]
    }
    return Rules(resource, non_resource)


def can_i(cluster: Cluster, user: str, *args: str, extra: tuple[str, ...] = ()) -> bool:
    proc = cluster.kubectl("auth", "can-i", f"--as={user}", *extra, *args, check=False)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), (args, proc.stdout, proc.stderr)
    return answer == "yes"


class Namespaces(NamedTuple):
    tenant: str
    plain: str
    baseline_user: str


@pytest.fixture(scope="module")
def namespaces(cluster: Cluster) -> Iterator[Namespaces]:
    suffix = uuid.uuid4().hex[:6]
    tenant, plain = f"e2e-rbac-tenant-{suffix}", f"e2e-rbac-plain-{suffix}"
    cluster.create_namespace(tenant, OPT_IN)
    cluster.create_namespace(plain)
    cluster.kubectl("create", "serviceaccount", "fresh", "-n", plain)
    cluster.kubectl("create", "serviceaccount", "app", "-n", tenant)

    def bound() -> bool:
        found = cluster.kubectl(
            "get", "rolebinding", "bento-juicefs-models-ready", "-n", tenant, check=False
        )
        return found.returncode == 0

    wait_for(bound, timeout=30, what="the namespace controller's RoleBinding")
    try:
        yield Namespaces(tenant, plain, f"system:serviceaccount:{plain}:fresh")
    finally:
        for name in (tenant, plain):
            cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def extra_rules(cluster: Cluster, user: str, namespace: str, baseline_user: str) -> set[Atom]:
    """What user holds in namespace beyond every service account's own."""
    mine, everyone = rules(cluster, user, namespace), rules(cluster, baseline_user, namespace)
    assert everyone.resource <= mine.resource
    assert mine.non_resource == everyone.non_resource, (user, namespace)
    return mine.resource - everyone.resource


def test_the_docs_tables_parse() -> None:
    injector = documented("security.md", "### The injector")
    agent = documented("security.md", "### The node agent")
    workloads = documented("security.md", "### The workloads")
    assert Atom("", "secrets", "patch", "juicefs-models-credentials") in expected(injector, "x")
    assert Atom("", "secrets", "get", "*") in expected(injector, SYSTEM)
    assert Atom("events.k8s.io", "events", "create", "*") in expected(agent, "default")
    assert expected(workloads, "t", own="t") == {
        Atom("", "pods/status", "get", "*"),
        Atom("", "pods/status", "patch", "*"),
        Atom("", "events", "create", "*"),
    }
    # The node agent's rows are the same in both documents.
    other = documented("node-agent.md", "## Permissions")
    for namespace in (SYSTEM, "default", "t"):
        assert expected(agent, namespace) == expected(other, namespace)


@pytest.mark.parametrize(
    ("who", "user", "heading", "doc"),
    [
        ("injector", INJECTOR, "### The injector", "security.md"),
        ("node agent", AGENT, "### The node agent", "security.md"),
        ("node agent", AGENT, "## Permissions", "node-agent.md"),
    ],
)
def test_the_system_identities_hold_exactly_their_rows(
    cluster: Cluster, namespaces: Namespaces, who: str, user: str, heading: str, doc: str
) -> None:
    rows = documented(doc, heading)
    for namespace in (SYSTEM, namespaces.tenant, "default"):
        held = extra_rules(cluster, user, namespace, namespaces.baseline_user)
        wanted = expected(rows, namespace)
        assert held == wanted, (
            f"{who} in {namespace}: held but not documented {sorted(held - wanted)}; "
            f"documented but not held {sorted(wanted - held)}"
        )


@pytest.mark.parametrize("account", ["default", "app"])
def test_a_workload_holds_exactly_its_rows_and_only_in_its_namespace(
    cluster: Cluster, namespaces: Namespaces, account: str
) -> None:
    rows = documented("security.md", "### The workloads")
    user = f"system:serviceaccount:{namespaces.tenant}:{account}"
    for namespace in (namespaces.tenant, "default", SYSTEM, namespaces.plain):
        held = extra_rules(cluster, user, namespace, namespaces.baseline_user)
        assert held == expected(rows, namespace, own=namespaces.tenant), (account, namespace)
    # A namespace that is not opted in gives its service accounts nothing.
    plain = f"system:serviceaccount:{namespaces.plain}:default"
    assert extra_rules(cluster, plain, namespaces.plain, namespaces.baseline_user) == set()


def test_nothing_outside_the_rows(cluster: Cluster, namespaces: Namespaces) -> None:
    tenant = namespaces.tenant
    workload = f"system:serviceaccount:{tenant}:app"
    granted = {
        INJECTOR: [
            ("patch", "secrets/juicefs-models-credentials", "-n", tenant),
            ("create", "secrets/juicefs-models-credentials", "-n", tenant),
            ("delete", "rolebindings/bento-juicefs-models-ready", "-n", tenant),
            ("bind", "clusterroles/bento-juicefs-models-ready"),
            ("patch", "namespaces", "-A"),
            ("get", "secrets", "-n", SYSTEM),
        ],
        workload: [
            ("patch", "pods", "--subresource=status", "-n", tenant),
            ("create", "events", "-n", tenant),
        ],
        # The pods on its node it mounts for, in any namespace: their
        # condition (fenced: bento-juicefs-node-agent-pods-fence) and Events.
        AGENT: [
            ("list", "pods", "-A"),
            ("patch", "pods", "--subresource=status", "-n", tenant),
            ("create", "events", "-n", tenant),
        ],
    }
    refused = {
        INJECTOR: [
            ("get", "secrets", "-n", tenant),
            ("get", "secrets/juicefs-models-credentials", "-n", tenant),
            ("list", "secrets", "-A"),
            ("watch", "secrets", "-A"),
            ("patch", "secrets/kube-root-ca.crt", "-n", tenant),
            ("patch", "secrets/other", "-n", "kube-system"),
            ("create", "secrets", "-n", tenant),  # a POST has no name: refused
            ("delete", "secrets/bento-juicefs-injector-ca", "-n", SYSTEM),
            ("patch", "rolebindings/admin", "-n", tenant),
            ("create", "rolebindings", "-n", tenant),
            ("bind", "clusterroles/cluster-admin"),
            ("escalate", "clusterroles"),
            ("create", "clusterrolebindings"),
            ("impersonate", "serviceaccounts"),
            ("patch", "mutatingwebhookconfigurations/other"),
            ("patch", "validatingadmissionpolicies/bento-juicefs-injector-fence"),
            ("create", "pods", "-n", tenant),
            ("create", "pods/exec", "-n", tenant),
            ("delete", "namespaces"),
            ("create", "serviceaccounts/token", "-n", SYSTEM),
        ],
        AGENT: [
            ("get", "secrets", "-n", SYSTEM),
            ("get", "secrets", "-n", tenant),
            ("patch", "nodes", "--subresource=status"),
            ("delete", "nodes"),
            ("create", "pods", "-n", tenant),
            ("patch", "pods", "-n", tenant),
            ("delete", "pods", "-n", tenant),
            ("create", "pods/exec", "-n", tenant),
            ("update", "pods", "--subresource=status", "-n", tenant),
        ],
        workload: [
            ("patch", "pods", "-n", tenant),
            ("get", "pods", "-n", tenant),
            ("list", "pods", "-n", tenant),
            ("create", "pods", "-n", tenant),
            ("get", "secrets", "-n", tenant),
            ("patch", "pods", "--subresource=status", "-n", "default"),
            ("patch", "pods", "--subresource=status", "-n", namespaces.plain),
            ("create", "events", "-n", "default"),
            ("create", "serviceaccounts/token", "-n", tenant),
        ],
    }
    wrong = [(u, a) for u, asks in granted.items() for a in asks if not can_i(cluster, u, *a)]
    wrong += [(u, a) for u, asks in refused.items() for a in asks if can_i(cluster, u, *a)]
    assert wrong == []


def as_injector(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(*args, f"--as={INJECTOR}", check=False)


def test_the_injector_may_change_only_its_annotation_of_a_namespace(
    cluster: Cluster, namespaces: Namespaces
) -> None:
    namespace = namespaces.plain  # not opted in: the controller leaves it be
    allowed = as_injector(
        cluster, "annotate", "namespace", namespace, f"{PROVISIONED}=secret/x", "--overwrite"
    )
    assert allowed.returncode == 0, allowed.stderr
    denied = {
        "a Pod Security label": as_injector(
            cluster,
            "label",
            "namespace",
            namespace,
            "pod-security.kubernetes.io/enforce=privileged",
        ),
        "the opt-in label": as_injector(
            cluster, "label", "namespace", namespace, "juicefs.bentoml.com/injection=enabled"
        ),
        "another annotation": as_injector(
            cluster, "annotate", "namespace", namespace, "example.com/owner=injector"
        ),
    }
    for what, proc in denied.items():
        assert proc.returncode != 0, f"{what} was allowed"
        assert "ValidatingAdmissionPolicy 'bento-juicefs-injector-fence'" in proc.stderr, (
            proc.stderr
        )
        assert f"namespace {namespace}: the injector may change only the" in proc.stderr
        print(f"denied, {what}: {proc.stderr.strip()}")
    labels = cluster.get_json("namespace", namespace)["metadata"].get("labels", {})
    assert "pod-security.kubernetes.io/enforce" not in labels
    assert "juicefs.bentoml.com/injection" not in labels
    # People are not fenced.
    cluster.kubectl("annotate", "namespace", namespace, f"{PROVISIONED}-")


def _patch_status(
    cluster: Cluster, namespace: str, pod: str, token_pod: dict[str, Any], condition: str
) -> subprocess.CompletedProcess[str]:
    patch = {"status": {"conditions": [{"type": condition, "status": "True"}]}}
    return cluster.kubectl(
        "patch",
        "pod",
        pod,
        "-n",
        namespace,
        "--subresource=status",
        "--type=strategic",
        "-p",
        json.dumps(patch),
        f"--as=system:serviceaccount:{namespace}:app",
        f"--as-user-extra={POD_NAME}={token_pod['metadata']['name']}",
        f"--as-user-extra={POD_UID}={token_pod['metadata']['uid']}",
        check=False,
    )


def test_a_workloads_pods_status_is_fenced_to_its_own_pod_and_condition(
    cluster: Cluster, namespaces: Namespaces
) -> None:
    namespace = namespaces.tenant
    pods = {}
    for name in ("own", "other"):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "serviceAccountName": "app",
                "nodeSelector": {"e2e.bento-juicefs/nowhere": "true"},  # never scheduled
                "containers": [{"name": "main", "image": "busybox"}],
            },
        }
        cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(pod))
        pods[name] = cluster.get_json("pod", name, "-n", namespace)
    allowed = _patch_status(cluster, namespace, "own", pods["own"], GATE)
    assert allowed.returncode == 0, allowed.stderr
    for target, condition in (("other", GATE), ("own", "example.com/other")):
        proc = _patch_status(cluster, namespace, target, pods["own"], condition)
        assert proc.returncode != 0, (target, condition)
        assert "ValidatingAdmissionPolicy 'bento-juicefs-models-ready-fence'" in proc.stderr
