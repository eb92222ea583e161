"""The node agent's manifests agree with the code they configure.

manifests/base cannot read the injector's config or common/warm.py, so the
names are spelled out there; these tests keep them in step. The e2e suite
runs the RBAC and the fence on a real apiserver
(tests/e2e/test_node_agent_fence.py). The local cluster's DaemonSet
(devcluster.installs.node_agent.local_daemonset) is the shipped one with this
machine's paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from common.warm import STARTUP_TAINT, WARM_ANNOTATION, WARM_LABEL_PREFIX
from devcluster.installs.node_agent import CONFIG_MAP, local_daemonset, shipped_daemonset
from devcluster.node.host import kubelet_root_dir, node_cache_dir
from injector.config import InjectorConfig
from nodeagent.cli import DEFAULT_KUBELET_ROOT

BASE = Path(__file__).resolve().parent.parent / "manifests" / "base"
SERVICE_ACCOUNT = "bento-juicefs-node-agent"
PODS_FENCE = "policy-node-agent-pods-fence.yaml"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((BASE / name).read_text()) if d]


def one(name: str, kind: str) -> dict[str, Any]:
    (found,) = [d for d in documents(name) if d["kind"] == kind]
    return found


def test_every_file_is_in_the_kustomization() -> None:
    resources = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    assert "node-agent.yaml" in resources
    assert "policy-node-agent-fence.yaml" in resources
    assert PODS_FENCE in resources


def test_the_fence_names_the_agents_service_account_and_keys() -> None:
    account = one("node-agent.yaml", "ServiceAccount")["metadata"]
    policy = one("policy-node-agent-fence.yaml", "ValidatingAdmissionPolicy")["spec"]
    (condition,) = policy["matchConditions"]
    username = f"system:serviceaccount:{account['namespace']}:{account['name']}"
    assert f"'{username}'" in condition["expression"]
    variables = {v["name"]: str(v["expression"]).strip() for v in policy["variables"]}
    assert variables["labelPrefix"] == f"'{WARM_LABEL_PREFIX}'"
    assert variables["annotation"] == f"'{WARM_ANNOTATION}'"
    assert variables["startupTaint"] == f"'{STARTUP_TAINT}'"
    binding = one("policy-node-agent-fence.yaml", "ValidatingAdmissionPolicyBinding")["spec"]
    assert binding == {
        "policyName": "bento-juicefs-node-agent-fence",
        "validationActions": ["Deny"],
    }


def test_the_agent_tolerates_the_startup_taint_it_removes() -> None:
    spec = one("node-agent.yaml", "DaemonSet")["spec"]["template"]["spec"]
    startup = {"key": STARTUP_TAINT, "operator": "Exists", "effect": "NoSchedule"}
    assert spec["tolerations"][0] == startup


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
    assert container["args"][2:4] == ["--config", "/etc/bento-juicefs/config.yaml"]

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
    writable = {"node-cache", "kubelet-root"}
    assert all(m.get("readOnly") for m in container["volumeMounts"] if m["name"] not in writable)


def test_the_daemonset_mounts_the_kubelet_root_bidirectional_and_names_it() -> None:
    """What the agent mounts for unprivileged sidecars is under the kubelet's root dir."""
    spec = one("node-agent.yaml", "DaemonSet")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "kubelet-root"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "kubelet-root"]
    assert volume["hostPath"] == {"path": DEFAULT_KUBELET_ROOT, "type": "Directory"}
    # The same path inside, and its mounts reach the host and the pods.
    assert mount == {
        "name": "kubelet-root",
        "mountPath": DEFAULT_KUBELET_ROOT,
        "mountPropagation": "Bidirectional",
    }
    args = container["args"]
    assert args[args.index("--kubelet-root") + 1] == DEFAULT_KUBELET_ROOT
    assert args.count("--kubelet-root") == 1
    assert args[args.index("--config") + 1] == "/etc/bento-juicefs/config.yaml"
    # Bidirectional propagation is allowed only to a privileged container.
    assert container["securityContext"]["privileged"] is True


def test_the_agents_rbac_is_read_only_but_for_nodes_pod_status_and_events() -> None:
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
        *(("", "pods", verb) for verb in read),
        ("", "pods/status", "get"),
        ("", "pods/status", "patch"),
        *(
            (group, "events", verb)
            for group in ("", "events.k8s.io")
            for verb in ("create", "patch")
        ),
    }
    # One ClusterRole, bound cluster-wide (Events on its Node in default and on
    # the pods it serves in theirs); no Role of its own any more.
    assert sorted(roles) == [
        ("ClusterRole", SERVICE_ACCOUNT),
        ("ClusterRoleBinding", SERVICE_ACCOUNT),
        ("DaemonSet", SERVICE_ACCOUNT),
        ("ServiceAccount", SERVICE_ACCOUNT),
    ]
    binding = roles[("ClusterRoleBinding", SERVICE_ACCOUNT)]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": SERVICE_ACCOUNT,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": "bento-juicefs-system"}
    ]


# --- the pods fence ------------------------------------------------------------------


def variables_of(policy: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: " ".join(str(v["expression"]).split()) for v in policy["variables"]}


def pods_fence() -> dict[str, Any]:
    policy = one(PODS_FENCE, "ValidatingAdmissionPolicy")
    assert policy["metadata"]["name"] == "bento-juicefs-node-agent-pods-fence"
    spec: dict[str, Any] = policy["spec"]
    return spec


def models_ready_fence() -> dict[str, Any]:
    spec: dict[str, Any] = one("policy-models-ready-fence.yaml", "ValidatingAdmissionPolicy")[
        "spec"
    ]
    return spec


def test_the_pods_fence_takes_the_agents_pod_status_writes() -> None:
    config = InjectorConfig()
    account = one("node-agent.yaml", "ServiceAccount")["metadata"]
    policy = pods_fence()
    assert policy["failurePolicy"] == "Fail"
    # Every namespace (the agent's RBAC is cluster-wide), pods/status only.
    assert policy["matchConstraints"] == {
        "resourceRules": [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["UPDATE"],
                "resources": ["pods/status"],
            }
        ]
    }
    (condition,) = policy["matchConditions"]
    username = f"system:serviceaccount:{account['namespace']}:{account['name']}"
    assert " ".join(condition["expression"].split()) == f"request.userInfo.username == '{username}'"
    variables = variables_of(policy)
    assert variables["condition"] == f"'{config.readiness.condition_type}'"
    assert variables["agentVolume"] == f"'{config.volumes.agent_name}'"
    # The node fence's idiom for the bound token's node, word for word.
    node_fence = one("policy-node-agent-fence.yaml", "ValidatingAdmissionPolicy")["spec"]
    assert variables["tokenNodeName"] == variables_of(node_fence)["tokenNodeName"]
    # The pod as stored: its node and volumes cannot change in a status write.
    assert variables["nodeName"] == "oldObject.spec.?nodeName.orValue('')"
    binding = one(PODS_FENCE, "ValidatingAdmissionPolicyBinding")
    assert binding["metadata"]["name"] == "bento-juicefs-node-agent-pods-fence"
    assert binding["spec"] == {
        "policyName": "bento-juicefs-node-agent-pods-fence",
        "validationActions": ["Deny"],
    }


def test_the_pods_fence_holds_its_node_the_agents_pods_and_one_condition() -> None:
    validations = pods_fence()["validations"]
    expressions = [" ".join(str(v["expression"]).split()) for v in validations]
    node, volume, conditions, rest = expressions
    # A pod on no node ('') is refused whatever the token says.
    assert node == "variables.nodeName != '' && variables.nodeName in variables.tokenNodeName"
    assert volume == (
        "oldObject.spec.?volumes.orValue([]).exists(v, v.name == variables.agentVolume)"
    )
    assert conditions == (
        "object.status.?conditions.orValue([]).filter(c, c.type != variables.condition) == "
        "oldObject.status.?conditions.orValue([]).filter(c, c.type != variables.condition)"
    )
    # Every other status field, label, annotation and finalizer (checked field by
    # field in test_the_pod_status_fences_hold_every_other_status_field).
    assert rest.startswith("object.status.?observedGeneration == ")
    for validation in validations:
        assert validation["reason"] == "Forbidden"
        message = " ".join(validation["messageExpression"].split())
        assert message.startswith("'pod ' + variables.pod + ")
        assert "node agent" in message


def test_the_pod_status_fences_hold_every_other_status_field() -> None:
    """Every PodStatus field the client knows, but conditions, is compared before and after."""
    from kubernetes_asyncio.client import V1PodStatus

    expression = " ".join(str(pods_fence()["validations"][-1]["expression"]).split())
    compared = {
        part.split(" == ")[0].removeprefix("object.status.?")
        for part in expression.split(" && ")
        if part.startswith("object.status.?")
    }
    for part in expression.split(" && "):
        field = part.split(" == ")[0].removeprefix("object.")
        assert part == f"object.{field} == oldObject.{field}", part
    # The client's JSON names of PodStatus (its generated model's attribute_map).
    names: dict[str, str] = vars(V1PodStatus)["attribute_map"]
    fields = set(names.values()) - {"conditions"}
    assert fields <= compared, sorted(fields - compared)
    assert "conditions" not in compared
    for metadata in ("labels", "annotations", "finalizers"):
        assert f"object.metadata.?{metadata} == oldObject.metadata.?{metadata}" in expression


def test_the_models_ready_fence_leaves_tenants_no_say_over_the_condition() -> None:
    """No identity but the node agent's (and system:masters) may change a pod's condition, in
    any namespace: keyed on the identity, not on the opt-in label, so opting out opens nothing."""
    config = InjectorConfig()
    policy = models_ready_fence()
    assert policy["failurePolicy"] == "Fail"
    assert "namespaceSelector" not in policy["matchConstraints"]
    account = one("node-agent.yaml", "ServiceAccount")["metadata"]
    agent = f"system:serviceaccount:{account['namespace']}:{account['name']}"
    (condition,) = policy["matchConditions"]
    assert " ".join(condition["expression"].split()) == (
        f"request.userInfo.username != '{agent}' && "
        "!request.userInfo.?groups.orValue([]).exists(g, g == 'system:masters')"
    )
    assert variables_of(policy)["condition"] == f"'{config.readiness.condition_type}'"
    (only,) = policy["validations"]
    assert " ".join(only["expression"].split()) == (
        "object.status.?conditions.orValue([]).filter(c, c.type == variables.condition) == "
        "oldObject.status.?conditions.orValue([]).filter(c, c.type == variables.condition)"
    )
    assert only["reason"] == "Forbidden"
    message = " ".join(only["messageExpression"].split())
    assert "only the node agent sets" in message
    assert "no other identity may change it" in message


# --- the local cluster's DaemonSet ----------------------------------------------------


def test_the_local_daemonset_names_the_local_nodes_paths(tmp_path: Path) -> None:
    node = tmp_path / "cluster.0" / "node"
    cache, kubelet = str(node_cache_dir(node)), str(kubelet_root_dir(node))
    assert kubelet == f"{node}/kubelet"  # what devcluster.node.node gives the kubelet as --root-dir
    shipped = shipped_daemonset()
    before = yaml.safe_dump(shipped)
    local = local_daemonset(shipped, cache, kubelet, ["--resync-seconds", "2"])
    assert yaml.safe_dump(shipped) == before  # a copy
    spec = local["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    host_paths = {v["name"]: v["hostPath"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths == {
        "node-cache": {"path": cache, "type": "DirectoryOrCreate"},
        "kubelet-root": {"path": kubelet, "type": "Directory"},
    }
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["node-cache"]["mountPath"] == cache
    assert mounts["kubelet-root"] == {
        "name": "kubelet-root",
        "mountPath": kubelet,
        "mountPropagation": "Bidirectional",
    }
    assert container["args"] == [
        "nodeagent",
        "run",
        "--config",
        "/etc/bento-juicefs/config.yaml",
        "--kubelet-root",
        kubelet,
        "--resync-seconds",
        "2",
    ]
    assert container["imagePullPolicy"] == "Never"
    (config,) = [v for v in spec["volumes"] if "configMap" in v]
    assert config["configMap"]["name"] == CONFIG_MAP
    # Nothing else: put the shipped values back and it is the shipped DaemonSet.
    shipped_spec = shipped["spec"]["template"]["spec"]
    for volume in spec["volumes"]:
        (original,) = [v for v in shipped_spec["volumes"] if v["name"] == volume["name"]]
        volume.clear()
        volume.update(original)
    container["volumeMounts"] = shipped_spec["containers"][0]["volumeMounts"]
    container["args"] = shipped_spec["containers"][0]["args"]
    del container["imagePullPolicy"]
    assert local == shipped


def test_the_local_daemonset_refuses_a_host_path_it_does_not_know() -> None:
    shipped = shipped_daemonset()
    spec = shipped["spec"]["template"]["spec"]
    spec["volumes"].append({"name": "etc", "hostPath": {"path": "/etc"}})
    with pytest.raises(ValueError, match="hostPath volume 'etc'"):
        local_daemonset(shipped, "/tmp/cache", "/tmp/kubelet", [])
