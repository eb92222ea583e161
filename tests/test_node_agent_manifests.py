"""The node agent's manifests agree with the code they configure.

manifests/base cannot read the injector's config or common/warm.py, so the
names are spelled out there; these tests keep them in step. The e2e suite
runs the RBAC and the fence on a real apiserver
(tests/e2e/test_node_agent_fence.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from common.warm import NODE_EVENTS_NAMESPACE, WARM_ANNOTATION, WARM_LABEL_PREFIX
from injector.config import InjectorConfig

BASE = Path(__file__).resolve().parent.parent / "manifests" / "base"
SERVICE_ACCOUNT = "bento-juicefs-node-agent"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((BASE / name).read_text()) if d]


def one(name: str, kind: str) -> dict[str, Any]:
    (found,) = [d for d in documents(name) if d["kind"] == kind]
    return found


def test_every_file_is_in_the_kustomization() -> None:
    resources = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    assert "node-agent.yaml" in resources
    assert "policy-node-agent-fence.yaml" in resources


def test_the_fence_names_the_agents_service_account_and_keys() -> None:
    account = one("node-agent.yaml", "ServiceAccount")["metadata"]
    policy = one("policy-node-agent-fence.yaml", "ValidatingAdmissionPolicy")["spec"]
    (condition,) = policy["matchConditions"]
    username = f"system:serviceaccount:{account['namespace']}:{account['name']}"
    assert f"'{username}'" in condition["expression"]
    variables = {v["name"]: str(v["expression"]).strip() for v in policy["variables"]}
    assert variables["labelPrefix"] == f"'{WARM_LABEL_PREFIX}'"
    assert variables["annotation"] == f"'{WARM_ANNOTATION}'"
    binding = one("policy-node-agent-fence.yaml", "ValidatingAdmissionPolicyBinding")["spec"]
    assert binding == {
        "policyName": "bento-juicefs-node-agent-fence",
        "validationActions": ["Deny"],
    }


def test_the_daemonset_runs_the_injectors_image_config_and_node_cache() -> None:
    config = InjectorConfig()
    injector = one("deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    spec = one("node-agent.yaml", "DaemonSet")["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == SERVICE_ACCOUNT
    (container,) = spec["containers"]
    assert container["image"] == injector["containers"][0]["image"]
    assert container["args"][:2] == ["nodeagent", "run"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}

    injector_config = next(v for v in injector["volumes"] if "configMap" in v)
    assert volumes[mounts["/etc/bento-juicefs"]]["configMap"] == injector_config["configMap"]
    assert container["args"][-1] == "/etc/bento-juicefs/config.yaml"

    # The profile the shipped ConfigMap names, and the agent's path under it.
    shipped = yaml.safe_load(one("config.yaml", "ConfigMap")["data"]["config.yaml"])
    node_cache = config.cluster.profiles[shipped["cluster"]["platformProfile"]].node_cache_path
    assert volumes[mounts[str(node_cache)]]["hostPath"] == {
        "path": node_cache,
        "type": "DirectoryOrCreate",
    }

    volume = config.juicefs.default_volume
    credentials = volumes[mounts[f"/etc/bento-juicefs/credentials/{volume}"]]["projected"]
    secret = config.juicefs.secret_name_template.format(volume=volume)
    keys = {
        item["key"]: source["secret"]["optional"]
        for source in credentials["sources"]
        for item in source["secret"]["items"]
        if source["secret"]["name"] == secret
    }
    assert keys == {
        config.juicefs.meta_url_key: False,
        config.juicefs.access_key_key: True,
        config.juicefs.secret_key_key: True,
    }
    assert all(m.get("readOnly") for m in container["volumeMounts"] if m["name"] != "node-cache")


def test_the_agents_rbac_is_read_only_but_for_nodes_and_node_events() -> None:
    roles = {(d["kind"], d["metadata"]["name"]): d for d in documents("node-agent.yaml")}
    cluster_rules = roles[("ClusterRole", SERVICE_ACCOUNT)]["rules"]
    granted = {
        (group, resource, verb)
        for rule in cluster_rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    read = {"get", "list", "watch"}
    assert granted == {
        *(("", "namespaces", verb) for verb in read),
        *(("apps", "deployments", verb) for verb in read),
        *(("apps", "statefulsets", verb) for verb in read),
        *(("", "nodes", verb) for verb in (*read, "patch")),
    }
    events = roles[("Role", f"{SERVICE_ACCOUNT}-events")]
    assert events["metadata"]["namespace"] == NODE_EVENTS_NAMESPACE
    assert events["rules"] == [
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]}
    ]
    for kind, role in (
        ("ClusterRoleBinding", SERVICE_ACCOUNT),
        ("RoleBinding", events["metadata"]["name"]),
    ):
        binding = roles[(kind, role)]
        assert binding["roleRef"]["name"] == role
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": "bento-juicefs-system"}
        ]
