"""Least privilege on a real apiserver: each identity holds exactly its documented rows.

For the injector and the node agent, the rules the apiserver reports for
them (a SelfSubjectRulesReview as that service account, which is what
`kubectl auth can-i --list` prints), minus what every service account holds
(those of a fresh one), must be the rows of docs/security.md's tables (and
node-agent.md's), in their own namespace, in a tenant namespace and in
`default`; the workloads of an opted-in namespace hold nothing more than a
fresh service account: the injector binds no role there, and deletes the
readiness RoleBinding an older version recorded. Then `kubectl auth can-i`
for things outside the rows, and the injector's and the readiness fences,
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
LEGACY_BINDING = "bento-juicefs-models-ready"
CREDENTIALS = "juicefs-models-credentials"


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
    cluster.wait_provisioned(tenant)
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
    assert Atom("", "secrets", "patch", "juicefs-models-credentials") in expected(injector, "x")
    assert Atom("", "secrets", "get", "*") in expected(injector, SYSTEM)
    assert Atom("rbac.authorization.k8s.io", "rolebindings", "delete", LEGACY_BINDING) in (
        expected(injector, "x")
    )
    assert Atom("events.k8s.io", "events", "create", "*") in expected(agent, "default")
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
def test_a_workload_of_an_opted_in_namespace_holds_nothing_more(
    cluster: Cluster, namespaces: Namespaces, account: str
) -> None:
    """Opting in grants the namespace's service accounts nothing: no RoleBinding of ours."""
    user = f"system:serviceaccount:{namespaces.tenant}:{account}"
    for namespace in (namespaces.tenant, "default", SYSTEM, namespaces.plain):
        held = extra_rules(cluster, user, namespace, namespaces.baseline_user)
        assert held == set(), (account, namespace)
    bindings = cluster.get_json("rolebindings", "-n", namespaces.tenant)["items"]
    assert LEGACY_BINDING not in [b["metadata"]["name"] for b in bindings]


def test_nothing_outside_the_rows(cluster: Cluster, namespaces: Namespaces) -> None:
    tenant = namespaces.tenant
    workload = f"system:serviceaccount:{tenant}:app"
    granted = {
        INJECTOR: [
            ("patch", "secrets/juicefs-models-credentials", "-n", tenant),
            ("create", "secrets/juicefs-models-credentials", "-n", tenant),
            ("delete", f"rolebindings/{LEGACY_BINDING}", "-n", tenant),
            ("patch", "namespaces", "-A"),
            ("get", "secrets", "-n", SYSTEM),
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
            ("patch", f"rolebindings/{LEGACY_BINDING}", "-n", tenant),
            ("delete", "rolebindings/admin", "-n", tenant),
            ("bind", f"clusterroles/{LEGACY_BINDING}"),
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
            ("patch", "pods", "--subresource=status", "-n", tenant),
            ("get", "pods", "--subresource=status", "-n", tenant),
            ("create", "events", "-n", tenant),
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


def test_a_legacy_readiness_role_binding_in_the_record_is_deleted(
    cluster: Cluster, namespaces: Namespaces
) -> None:
    """What an older version left in an opted-in namespace: its RoleBinding, named in
    the namespace's record. The controller deletes it and drops it from the record."""
    tenant = namespaces.tenant
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": LEGACY_BINDING,
            "namespace": tenant,
            "labels": {"app.kubernetes.io/managed-by": "bento-juicefs-injector"},
        },
        # The ClusterRole is gone with that version: a binding to nothing, still ours to remove.
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": LEGACY_BINDING,
        },
        "subjects": [
            {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Group",
                "name": f"system:serviceaccounts:{tenant}",
            }
        ],
    }
    cluster.apply(binding)
    record = f"rolebinding/{LEGACY_BINDING},secret/{CREDENTIALS}"
    # As the older controller wrote it (people are not fenced): the watch sees the change.
    cluster.kubectl("annotate", "namespace", tenant, f"{PROVISIONED}={record}", "--overwrite")

    def cleaned() -> bool:
        gone = cluster.kubectl("get", "rolebinding", LEGACY_BINDING, "-n", tenant, check=False)
        annotations = cluster.get_json("namespace", tenant)["metadata"].get("annotations", {})
        return gone.returncode != 0 and annotations.get(PROVISIONED) == f"secret/{CREDENTIALS}"

    wait_for(cleaned, timeout=60, what="the legacy RoleBinding deleted and dropped from the record")
    # The credentials copy stays.
    assert cluster.kubectl("get", "secret", CREDENTIALS, "-n", tenant, check=False).returncode == 0


def _patch_status(
    cluster: Cluster, namespace: str, pod: str, token_pod: dict[str, Any], condition: str
) -> subprocess.CompletedProcess[str]:
    """The pod's own token, as its app holds it, changing one condition of pod."""
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


def test_no_token_of_the_namespace_may_set_the_condition_whatever_its_rbac(
    cluster: Cluster, namespaces: Namespaces
) -> None:
    """RBAC refuses the namespace's service accounts; granted by the namespace itself, the
    readiness fence still refuses them our condition, even on the token's own pod."""
    namespace = namespaces.tenant
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "own"},
        "spec": {
            "serviceAccountName": "app",
            "nodeSelector": {"e2e.bento-juicefs/nowhere": "true"},  # never scheduled
            "containers": [{"name": "main", "image": "busybox"}],
        },
    }
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(pod))
    own = cluster.get_json("pod", "own", "-n", namespace)
    refused = _patch_status(cluster, namespace, "own", own, GATE)
    assert refused.returncode != 0
    assert "forbidden" in refused.stderr.lower()
    assert "ValidatingAdmissionPolicy" not in refused.stderr  # RBAC, before any policy
    # The namespace grants itself pods/status (a tenant admin may).
    cluster.kubectl(
        "create", "role", "self-granted", "-n", namespace, "--verb=get,patch",
        "--resource=pods/status",
    )  # fmt: skip
    cluster.kubectl(
        "create", "rolebinding", "self-granted", "-n", namespace, "--role=self-granted",
        f"--serviceaccount={namespace}:app",
    )  # fmt: skip
    try:

        def fenced() -> str | None:
            proc = _patch_status(cluster, namespace, "own", own, GATE)
            assert proc.returncode != 0, "the condition was set by a token of the namespace"
            return proc.stderr if "ValidatingAdmissionPolicy" in proc.stderr else None

        message = wait_for(fenced, timeout=30, what="RBAC to grant, and the fence to refuse")
        assert "ValidatingAdmissionPolicy 'bento-juicefs-models-ready-fence'" in message
        assert (
            "pod own: only the node agent sets its juicefs.bentoml.com/models-ready condition; "
            "no other identity may change it"
        ) in message
        # Not ours to fence: any other condition.
        other = _patch_status(cluster, namespace, "own", own, "example.com/other")
        assert other.returncode == 0, other.stderr
    finally:
        cluster.kubectl("delete", "rolebinding,role", "self-granted", "-n", namespace, check=False)
