"""The unprivileged sidecar (`sidecar.unprivileged`): what the injector adds passes `restricted`.

The node agent opens /dev/fuse and mounts for the pod; the sidecar reaches it
through a socket in its own emptyDir, holds no Kubernetes credential and no
host path. The default (the privileged sidecar) is covered by the other
tests and the golden files; here, each promise of the flag, one per test.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from common import env
from injector.admission import pod_review_request, review
from injector.check import check_pod_security
from injector.config import InjectorConfig, parse_config
from injector.mutation.owned import owned_names
from injector.plan import InjectionPlan, decide
from injector.podsecurity import ENFORCE, NamespaceSecurity, NamespaceSecurityRegistry, denial
from tests.helpers import bento_pod, env_of, inject, run, sidecar_of

STATUS = "juicefs.bentoml.com/status"
AGENT = "juicefs-agent"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
UNPRIVILEGED = parse_config({"sidecar": {"unprivileged": True}})
CLASSIC = parse_config(
    {"sidecar": {"unprivileged": True}, "cluster": {"kubernetesVersion": "1.28"}}
)
POD_CACHE = parse_config({"sidecar": {"unprivileged": True}, "cache": {"mode": "pod"}})
CONFIGS = {"native, node cache": UNPRIVILEGED, "classic": CLASSIC, "pod cache": POD_CACHE}
# Pod Security `restricted` (v1.30): the volume types it allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """What Pod Security `restricted` says about one container of the pod (and its volumes).

    The checks of the standard that a container or a volume can fail, read
    with the pod's own securityContext as the fallback, as the plugin does.
    """
    spec = pod["spec"]
    pod_context = spec.get("securityContext") or {}
    context = container.get("securityContext") or {}
    problems = []
    if context.get("privileged"):
        problems.append("privileged")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation != false")
    capabilities = context.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        problems.append("capabilities not dropping ALL")
    if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
        problems.append("capabilities added")
    if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
        problems.append("runAsNonRoot != true")
    if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
        problems.append("runAsUser=0")
    seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append("seccompProfile")
    if any(port.get("hostPort") for port in container.get("ports") or []):
        problems.append("hostPort")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']} is {'/'.join(sorted(kinds))}")
    return problems


def plan_for(config: InjectorConfig) -> InjectionPlan:
    decided = decide(bento_pod(), "serving", config)
    assert isinstance(decided, InjectionPlan)
    return decided


# --- the sidecar's securityContext ---------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_the_sidecar_passes_restricted(config: InjectorConfig) -> None:
    pod = inject(bento_pod(), config)
    assert restricted_violations(pod, sidecar_of(pod)) == []


def test_the_security_context_is_exactly_the_restricted_one() -> None:
    sidecar = sidecar_of(inject(bento_pod(), UNPRIVILEGED))
    assert sidecar["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": env.SIDECAR_UID,
        "runAsGroup": env.SIDECAR_UID,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def test_the_pods_own_root_defaults_are_not_inherited() -> None:
    """A pod running as root by default still gets a non-root sidecar."""
    pod = bento_pod(securityContext={"runAsUser": 0, "runAsNonRoot": False})
    sidecar = sidecar_of(inject(pod, UNPRIVILEGED))
    assert sidecar["securityContext"]["runAsUser"] == env.SIDECAR_UID
    assert sidecar["securityContext"]["runAsNonRoot"] is True


def test_a_restricted_pod_stays_restricted_once_injected() -> None:
    app_context = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod = bento_pod()
    pod["spec"]["containers"][0]["securityContext"] = app_context
    out = inject(pod, UNPRIVILEGED)
    for key in ("initContainers", "containers"):
        for container in out["spec"].get(key) or []:
            assert restricted_violations(out, container) == [], container["name"]


def test_the_check_refuses_the_privileged_sidecar() -> None:
    """The check above is not vacuous: the default sidecar fails it."""
    pod = inject(bento_pod())
    problems = restricted_violations(pod, sidecar_of(pod))
    assert "privileged" in problems
    assert "runAsNonRoot != true" in problems
    assert "volume juicefs-cache is hostPath" in problems


def test_the_flag_is_off_by_default() -> None:
    assert InjectorConfig().sidecar.unprivileged is False
    pod = inject(bento_pod())
    sidecar = sidecar_of(pod)
    assert sidecar["securityContext"]["privileged"] is True
    assert "JFS_AGENT_SOCKET" not in env_of(sidecar)
    assert AGENT not in {v["name"] for v in pod["spec"]["volumes"]}


# --- volumes and mounts --------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_no_host_path_in_either_cache_mode(config: InjectorConfig) -> None:
    for cache_mode in ("pod", "node"):
        pod = bento_pod()
        pod["metadata"]["annotations"] = {"juicefs.bentoml.com/cache-mode": cache_mode}
        out = inject(pod, config)
        assert [v for v in out["spec"]["volumes"] if "hostPath" in v] == []


def test_the_node_cache_is_an_empty_emptydir_without_a_storage_request() -> None:
    out = inject(bento_pod(), UNPRIVILEGED)
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert volumes["juicefs-cache"] == {"name": "juicefs-cache", "emptyDir": {}}
    assert "ephemeral-storage" not in sidecar_of(out)["resources"]["requests"]
    assert env_of(sidecar_of(out))["JFS_CACHE_MODE"] == "node"


def test_the_pod_cache_keeps_its_size_limit_and_storage_request() -> None:
    pod = bento_pod()
    pod["metadata"]["annotations"] = {"juicefs.bentoml.com/cache-size": "30Gi"}
    out = inject(pod, POD_CACHE)
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert volumes["juicefs-cache"]["emptyDir"] == {"sizeLimit": "30Gi"}
    assert sidecar_of(out)["resources"]["requests"]["ephemeral-storage"] == "30Gi"


def test_the_agent_volume_is_a_small_tmpfs() -> None:
    out = inject(bento_pod(), UNPRIVILEGED)
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert volumes[AGENT] == {"name": AGENT, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_every_sidecar_mount_is_host_to_container(config: InjectorConfig) -> None:
    mounts = sidecar_of(inject(bento_pod(), config))["volumeMounts"]
    assert [(m["name"], m["mountPath"], m.get("mountPropagation")) for m in mounts] == [
        ("juicefs-mount-dir", config.volumes.mount_path, "HostToContainer"),
        ("juicefs-cache", config.volumes.cache_path, "HostToContainer"),
        (AGENT, env.AGENT_DIR, "HostToContainer"),
        # An empty directory where a token would go (see the next test).
        (AGENT, TOKEN_DIR, None),
    ]


@pytest.mark.parametrize("automount", [None, True, False])
def test_no_token_mount_and_no_token_volume(automount: bool | None) -> None:
    pod = bento_pod()
    if automount is not None:
        pod["spec"]["automountServiceAccountToken"] = automount
    if automount is not False:
        # As the ServiceAccount admission plugin leaves the pod, before webhooks.
        token = {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}
        pod["spec"]["volumes"] = [{"name": "kube-api-access-1", "projected": {"sources": [token]}}]
        pod["spec"]["containers"][0]["volumeMounts"] = [
            {"name": "kube-api-access-1", "mountPath": TOKEN_DIR, "readOnly": True}
        ]
    out = inject(pod, UNPRIVILEGED)
    sidecar = sidecar_of(out)
    # The token's path holds an empty directory of the agent volume, so the
    # ServiceAccount admission plugin, run again after the webhook, adds nothing there.
    (at_token,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == TOKEN_DIR]
    assert at_token == {
        "name": AGENT,
        "mountPath": TOKEN_DIR,
        "subPath": "no-token",
        "readOnly": True,
    }
    assert all(not m["name"].startswith("kube-api-access") for m in sidecar["volumeMounts"])
    assert "juicefs-sa-token" not in {v["name"] for v in out["spec"]["volumes"]}
    assert "JFS_TOKEN_DIR" not in env_of(sidecar)


# --- the environment -----------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_the_agent_socket_and_private_mount_are_in_the_agent_volume(config: InjectorConfig) -> None:
    sidecar = sidecar_of(inject(bento_pod(), config))
    values = env_of(sidecar)
    (agent_mount,) = [
        m for m in sidecar["volumeMounts"] if m["name"] == AGENT and "subPath" not in m
    ]
    root = PurePosixPath(agent_mount["mountPath"])
    socket = env.AGENT_SOCKET.parse(values["JFS_AGENT_SOCKET"])
    private = env.PRIVATE_MOUNT.parse(values["JFS_PRIVATE_MOUNT"])
    assert socket == Path(root / env.AGENT_SOCKET_NAME)
    assert private == Path(root / env.AGENT_MOUNT_NAME)
    # The sidecar's own settings parse the whole environment the injector wrote.
    literal = {k: v for k, v in values.items() if isinstance(v, str)}
    assert env.AGENT_SOCKET.read(literal) == socket


# --- what app containers may not mount ------------------------------------------------------


@pytest.mark.parametrize("key", ["containers", "initContainers"])
def test_an_app_container_mounting_the_agent_volume_is_denied(key: str) -> None:
    pod = bento_pod()
    pod["spec"].setdefault(key, [{"name": "main", "image": "busybox"}])
    pod["spec"][key][0]["volumeMounts"] = [{"name": AGENT, "mountPath": "/agent"}]
    result = run(pod, UNPRIVILEGED)
    assert result.outcome == "denied"
    assert (
        f"container 'main' in spec.{key} mounts volume 'juicefs-agent', the node agent's "
        "socket for the sidecar, which only juicefs-mount may mount" in result.reason
    )


def test_the_agent_volume_is_sidecar_only_whatever_the_flag() -> None:
    """A pod cannot mount it ahead of the flag turning on, either."""
    pod = bento_pod()
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": AGENT, "mountPath": "/agent"}]
    assert run(pod).outcome == "denied"


def test_a_pods_own_volume_named_like_the_agent_volume_clashes() -> None:
    result = run(bento_pod(volumes=[{"name": AGENT, "emptyDir": {}}]), UNPRIVILEGED)
    assert result.outcome == "denied"
    assert "spec.volumes already has a volume named 'juicefs-agent'" in result.reason


def test_the_agent_volume_name_is_configurable() -> None:
    config = parse_config({"sidecar": {"unprivileged": True}, "volumes": {"agentName": "agent"}})
    assert owned_names(config).agent_volume == "agent"
    out = inject(bento_pod(), config)
    assert "agent" in {v["name"] for v in out["spec"]["volumes"]}
    assert any(m["name"] == "agent" for m in sidecar_of(out)["volumeMounts"])


# --- an injected pod, again ---------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_its_own_output_is_accepted_again_unchanged(config: InjectorConfig) -> None:
    again = run(inject(bento_pod(), config), config)
    assert again.outcome == "unchanged"
    assert again.ops == []


def test_a_forged_host_path_cache_is_denied() -> None:
    """With the flag on, no host path is ours, not even the configured node cache."""
    out = inject(bento_pod(), UNPRIVILEGED)
    volume = next(v for v in out["spec"]["volumes"] if v["name"] == "juicefs-cache")
    del volume["emptyDir"]
    node_cache = UNPRIVILEGED.node_cache_path
    volume["hostPath"] = {"path": f"{node_cache}/models", "type": "DirectoryOrCreate"}
    result = run(out, UNPRIVILEGED)
    assert result.outcome == "denied"
    assert "volume 'juicefs-cache' is hostPath, not what the injector creates" in result.reason


def test_a_forged_agent_volume_of_another_kind_is_denied() -> None:
    out = inject(bento_pod(), UNPRIVILEGED)
    volume = next(v for v in out["spec"]["volumes"] if v["name"] == AGENT)
    del volume["emptyDir"]
    volume["hostPath"] = {"path": "/var/run"}
    result = run(out, UNPRIVILEGED)
    assert result.outcome == "denied"
    assert "volume 'juicefs-agent' is hostPath" in result.reason


def test_the_status_says_unprivileged_and_lists_the_agent_volume() -> None:
    out = inject(bento_pod(), UNPRIVILEGED)
    status = json.loads(out["metadata"]["annotations"][STATUS])
    assert status["sidecar"] == {"name": "juicefs-mount", "mode": "native", "unprivileged": True}
    assert status["volumes"] == ["juicefs-mount-dir", "juicefs-cache", AGENT]
    assert "hostPath" not in status["cache"]["medium"]
    privileged = json.loads(inject(bento_pod())["metadata"]["annotations"][STATUS])
    assert "unprivileged" not in privileged["sidecar"]


# --- Pod Security ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("level", ["baseline", "restricted", "Restricted", None])
def test_pod_security_denies_nothing_when_unprivileged(
    config: InjectorConfig, level: str | None
) -> None:
    state = NamespaceSecurity(level, "v1.25")
    assert denial("team-a", state, plan_for(config), config) is None


def test_pod_security_still_denies_the_privileged_sidecar() -> None:
    config = InjectorConfig()
    assert denial("team-a", NamespaceSecurity("restricted"), plan_for(config), config)


def test_the_privileged_denial_names_the_unprivileged_sidecar_as_a_way_out() -> None:
    config = InjectorConfig()
    message = denial("team-a", NamespaceSecurity("baseline"), plan_for(config), config)
    assert message is not None
    assert "turn on sidecar.unprivileged in the injector's config" in message


def test_the_review_injects_in_a_restricted_namespace() -> None:
    registry = NamespaceSecurityRegistry()
    registry.observe("serving", {ENFORCE: "restricted"})
    request = pod_review_request(bento_pod(), "serving")
    assert review(request, UNPRIVILEGED, registry).outcome == "injected"
    assert review(request, InjectorConfig(), registry).outcome == "denied"


@pytest.mark.parametrize("level", ["baseline", "restricted"])
def test_the_checker_finds_restricted_namespaces_fine(level: str) -> None:
    namespace = {
        "metadata": {
            "name": "team",
            "labels": {"juicefs.bentoml.com/injection": "enabled", ENFORCE: level},
        }
    }
    (row,) = check_pod_security([namespace], UNPRIVILEGED)
    assert row.verdict == "ok"
    assert "the unprivileged juicefs-mount sidecar passes restricted" in row.found
    (privileged,) = check_pod_security([namespace], InjectorConfig())
    assert privileged.verdict == "FAIL"


# --- the config ------------------------------------------------------------------------------


def test_the_yaml_keys() -> None:
    config = parse_config({"sidecar": {"unprivileged": True}, "volumes": {"agentName": "a"}})
    assert config.sidecar.unprivileged is True
    assert config.volumes.agent_name == "a"
    dumped = InjectorConfig().to_yaml()
    assert "unprivileged: false" in dumped
    assert "agentName: juicefs-agent" in dumped
