"""The RBAC in manifests/base is docs/security.md's tables, and the fences name the right keys.

Static: the roles and bindings as written; tests/e2e/test_rbac.py checks
the same rows against what a real apiserver grants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio import client

from injector.config import InjectorConfig
from injector.namespaces import LEGACY_ROLE_BINDING, PROVISIONED, credential_secret_names
from tests.rbac_docs import Atom, documented

BASE = Path(__file__).resolve().parent.parent / "manifests" / "base"
SYSTEM = "bento-juicefs-system"
CONFIG = InjectorConfig()


def manifests() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for name in yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]:
        found.extend(d for d in yaml.safe_load_all((BASE / name).read_text()) if d)
    return found


def atoms(rules: list[dict[str, Any]]) -> set[Atom]:
    return {
        Atom(group, resource, verb, name)
        for rule in rules
        for group in rule.get("apiGroups") or [""]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames") or ["*"]
    }


def granted(account: str, namespace: str) -> dict[str, set[Atom]]:
    """What manifests/base binds to the service account: scope -> atoms."""
    docs = manifests()
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs}
    scopes: dict[str, set[Atom]] = {}
    for binding in docs:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        subjects = binding.get("subjects") or []
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == account and s["namespace"] == namespace
            for s in subjects
        ):
            continue
        ref = binding["roleRef"]
        role_namespace = None if ref["kind"] == "ClusterRole" else binding["metadata"]["namespace"]
        role = roles[(ref["kind"], role_namespace, ref["name"])]
        scope = (
            "cluster"
            if binding["kind"] == "ClusterRoleBinding"
            else binding["metadata"]["namespace"]
        )
        scopes.setdefault(scope, set()).update(atoms(role["rules"]))
    return scopes


def documented_scopes(doc: str, heading: str) -> dict[str, set[Atom]]:
    scopes: dict[str, set[Atom]] = {}
    for row in documented(doc, heading):
        scopes.setdefault(row.scope, set()).update(row.atoms)
    return scopes


def test_the_injectors_rbac_is_its_table() -> None:
    assert granted("bento-juicefs-injector", SYSTEM) == documented_scopes(
        "security.md", "### The injector"
    )


def test_the_node_agents_rbac_is_its_table_in_both_documents() -> None:
    held = granted("bento-juicefs-node-agent", SYSTEM)
    assert held == documented_scopes("security.md", "### The node agent")
    assert held == documented_scopes("node-agent.md", "## Permissions")


def test_no_role_or_binding_grants_a_tenant_anything() -> None:
    """Tenant namespaces get no RBAC from us: only the node agent sets models-ready."""
    kinds = {(d["kind"], d["metadata"]["name"]) for d in manifests()}
    assert ("ClusterRole", LEGACY_ROLE_BINDING) not in kinds
    for doc in manifests():
        if doc["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            for subject in doc.get("subjects") or []:
                assert subject["kind"] == "ServiceAccount", doc["metadata"]["name"]
                assert subject["namespace"] == SYSTEM, doc["metadata"]["name"]


def test_the_injectors_names_are_the_configs() -> None:
    """resourceNames spell out the config's defaults: the Secrets it copies, its webhook.

    And the readiness RoleBinding older versions made, which it may only delete.
    """
    role = next(
        d
        for d in manifests()
        if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "bento-juicefs-injector"
    )
    names = {
        resource: set(rule.get("resourceNames") or ["*"])
        for rule in role["rules"]
        for resource in rule["resources"]
    }
    assert names["secrets"] == set(credential_secret_names(CONFIG))
    assert names["rolebindings"] == {LEGACY_ROLE_BINDING}
    assert "clusterroles" not in names
    rolebindings = next(r for r in role["rules"] if r["resources"] == ["rolebindings"])
    assert rolebindings["verbs"] == ["delete"]
    assert names["mutatingwebhookconfigurations"] == {CONFIG.webhook.configuration_name}


def test_the_injector_fence_names_its_account_and_annotation() -> None:
    docs = manifests()
    policy = next(
        d
        for d in docs
        if d["kind"] == "ValidatingAdmissionPolicy"
        and d["metadata"]["name"] == "bento-juicefs-injector-fence"
    )["spec"]
    (condition,) = policy["matchConditions"]
    username = f"system:serviceaccount:{CONFIG.webhook.namespace}:bento-juicefs-injector"
    assert f"'{username}'" in condition["expression"]
    variables = {v["name"]: str(v["expression"]).strip() for v in policy["variables"]}
    assert variables["annotation"] == f"'{PROVISIONED}'"
    assert policy["failurePolicy"] == "Fail"
    binding = next(
        d
        for d in docs
        if d["kind"] == "ValidatingAdmissionPolicyBinding"
        and d["metadata"]["name"] == "bento-juicefs-injector-fence"
    )["spec"]
    assert binding == {"policyName": "bento-juicefs-injector-fence", "validationActions": ["Deny"]}


def test_every_write_of_the_node_agent_but_events_is_fenced() -> None:
    """Each resource the agent may write (events aside) is matched, on that write, by a
    Deny policy whose match condition is the agent's username."""
    username = f"system:serviceaccount:{SYSTEM}:bento-juicefs-node-agent"
    writes = {
        atom.resource
        for atoms_ in granted("bento-juicefs-node-agent", SYSTEM).values()
        for atom in atoms_
        if atom.verb not in ("get", "list", "watch") and atom.resource != "events"
    }
    assert writes == {"nodes", "pods/status"}
    docs = manifests()
    bindings = {
        d["spec"]["policyName"]: d["spec"]
        for d in docs
        if d["kind"] == "ValidatingAdmissionPolicyBinding"
    }
    fenced: dict[str, str] = {}
    for policy in docs:
        if policy["kind"] != "ValidatingAdmissionPolicy":
            continue
        spec = policy["spec"]
        conditions = [c["expression"] for c in spec.get("matchConditions") or []]
        if not any(f"'{username}'" in c for c in conditions):
            continue
        name = policy["metadata"]["name"]
        assert spec["failurePolicy"] == "Fail", name
        assert bindings[name]["validationActions"] == ["Deny"], name
        for rule in spec["matchConstraints"]["resourceRules"]:
            assert rule["operations"] == ["UPDATE"], name
            for resource in rule["resources"]:
                fenced[resource] = name
    assert fenced == {
        "nodes": "bento-juicefs-node-agent-fence",
        "pods/status": "bento-juicefs-node-agent-pods-fence",
    }


def policy_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = next(
        d
        for d in manifests()
        if d["kind"] == "ValidatingAdmissionPolicy" and d["metadata"]["name"] == name
    )["spec"]
    return spec


def test_the_models_ready_fence_leaves_no_service_account_of_the_namespace_a_say() -> None:
    """One rule, whichever pod the token is bound to: the condition is the node agent's."""
    policy = policy_spec("bento-juicefs-models-ready-fence")
    assert policy["failurePolicy"] == "Fail"
    assert "namespaceSelector" not in policy["matchConstraints"]  # every namespace
    (rule,) = policy["matchConstraints"]["resourceRules"]
    assert (rule["resources"], rule["operations"]) == (["pods/status"], ["UPDATE"])
    (condition,) = policy["matchConditions"]
    assert " ".join(condition["expression"].split()) == (
        "request.userInfo.username != "
        "'system:serviceaccount:bento-juicefs-system:bento-juicefs-node-agent' && "
        "!request.userInfo.?groups.orValue([]).exists(g, g == 'system:masters')"
    )
    variables = {v["name"]: v["expression"] for v in policy["variables"]}
    assert variables == {"condition": f"'{CONFIG.readiness.condition_type}'"}
    (validation,) = policy["validations"]
    assert " ".join(validation["expression"].split()) == (
        "object.status.?conditions.orValue([]).filter(c, c.type == variables.condition) == "
        "oldObject.status.?conditions.orValue([]).filter(c, c.type == variables.condition)"
    )
    assert validation["reason"] == "Forbidden"
    assert validation["messageExpression"] == (
        "'pod ' + object.metadata.name + ': only the node agent sets its "
        "juicefs.bentoml.com/models-ready condition; no other identity may change it'"
    )
    binding = next(
        d
        for d in manifests()
        if d["kind"] == "ValidatingAdmissionPolicyBinding"
        and d["metadata"]["name"] == "bento-juicefs-models-ready-fence"
    )["spec"]
    assert binding["validationActions"] == ["Deny"]


def test_the_webhook_fence_leaves_the_injector_only_the_ca_bundle() -> None:
    """The injector may patch its webhook configuration (its CA); the policy holds it to the
    caBundle: every field that says which requests go where, and how a failure is handled,
    is compared with the old object."""
    policy = policy_spec("bento-juicefs-webhook-fence")
    assert policy["failurePolicy"] == "Fail"
    (rule,) = policy["matchConstraints"]["resourceRules"]
    assert (rule["resources"], rule["operations"]) == (
        ["mutatingwebhookconfigurations"],
        ["UPDATE"],
    )
    (condition,) = policy["matchConditions"]
    assert " ".join(condition["expression"].split()) == (
        "request.userInfo.username == "
        "'system:serviceaccount:bento-juicefs-system:bento-juicefs-injector'"
    )
    metadata, webhooks = (" ".join(v["expression"].split()) for v in policy["validations"])
    for field in ("labels", "annotations", "finalizers", "ownerReferences"):
        assert f"object.metadata.?{field} == oldObject.metadata.?{field}" in metadata
    assert "object.webhooks.size() == oldObject.webhooks.size()" in webhooks
    # Every field of a MutatingWebhook but the caBundle, as the API client knows them.
    webhook_names: dict[str, str] = vars(client.V1MutatingWebhook)["attribute_map"]
    fields = set(webhook_names.values())
    for field in fields - {"name", "rules", "clientConfig"}:
        assert f"w.?{field} == o.?{field}" in webhooks, field
    assert "w.rules == o.rules" in webhooks
    assert "o.name == w.name" in webhooks
    config_names: dict[str, str] = vars(client.AdmissionregistrationV1WebhookClientConfig)[
        "attribute_map"
    ]
    config_fields = set(config_names.values())
    for field in config_fields - {"caBundle"}:
        assert f"w.clientConfig.?{field} == o.clientConfig.?{field}" in webhooks, field
    assert "caBundle" not in webhooks
    binding = next(
        d
        for d in manifests()
        if d["kind"] == "ValidatingAdmissionPolicyBinding"
        and d["metadata"]["name"] == "bento-juicefs-webhook-fence"
    )["spec"]
    assert binding["validationActions"] == ["Deny"]
