"""Behaviour of the decision and each mutation step, one concern per test."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from common import env
from injector.admission import pod_review_request as request_for
from injector.admission import review
from injector.config import ConfigError, InjectorConfig, parse_config
from injector.mutation.owned import owned_names
from tests.helpers import bento_pod, env_of, inject, restricted_violations, run, sidecar_of

STATUS = "juicefs.bentoml.com/status"


def annotated(**annotations: str) -> dict[str, Any]:
    pod = bento_pod()
    pod["metadata"]["annotations"] = {f"juicefs.bentoml.com/{k}": v for k, v in annotations.items()}
    return pod


def test_native_sidecar_first_with_startup_probe() -> None:
    pod = inject(bento_pod())
    sidecar = pod["spec"]["initContainers"][0]
    assert sidecar["name"] == "juicefs-mount"
    assert sidecar["restartPolicy"] == "Always"
    # The kubelet's own GET on the metrics port: no process in the container per run.
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/started", "port": "metrics"}
    assert {"name": "metrics", "containerPort": 9465, "protocol": "TCP"} in sidecar["ports"]
    assert "exec" not in sidecar["startupProbe"]
    assert "privileged" not in sidecar["securityContext"]
    assert sidecar["volumeMounts"][0]["mountPropagation"] == "HostToContainer"


def test_classic_sidecar_on_old_clusters() -> None:
    config = parse_config({"cluster": {"kubernetesVersion": "1.28"}})
    pod = inject(bento_pod(), config)
    assert "initContainers" not in pod["spec"]
    sidecar = pod["spec"]["containers"][0]
    assert sidecar["name"] == "juicefs-mount"
    assert "restartPolicy" not in sidecar
    # The mount's 300 s and the warmup's 3600 s: on the node cache the models
    # appear once the node agent has sealed them.
    wait = sidecar["lifecycle"]["postStart"]["exec"]["command"][-2:]
    assert wait == ["--wait", "--timeout=3900"]
    app = pod["spec"]["containers"][1]
    assert app["volumeMounts"][0]["mountPath"] == "/home/bentoml/bento/models"


@pytest.mark.parametrize(
    ("annotations", "seconds"),
    [
        ({}, 300 + 3600),  # node cache, warmup: the mount, then the seal
        ({"juicefs.bentoml.com/warmup-timeout": "10m"}, 300 + 600),
        ({"juicefs.bentoml.com/cache-mode": "pod"}, 300),  # the models show once mounted
        ({"juicefs.bentoml.com/warmup": "false"}, 300),  # no seal to wait for
    ],
)
def test_the_startup_probe_waits_for_the_seal_only_on_the_node_cache(
    annotations: dict[str, str], seconds: int
) -> None:
    pod = bento_pod()
    pod["metadata"].setdefault("annotations", {}).update(annotations)
    probe = sidecar_of(inject(pod))["startupProbe"]
    # Each run waits up to 20 s for the models itself (the sidecar holds the GET):
    # one Event per 20 s, not per second.
    assert probe["httpGet"]["path"] == "/started"
    assert probe["timeoutSeconds"] > 20
    assert probe["failureThreshold"] * 20 >= seconds


@pytest.mark.parametrize(
    "spec",
    [
        {"hostNetwork": True},  # the port would be the node's
        {"containers": [{"name": "main", "ports": [{"containerPort": 9465}]}]},  # the app's
    ],
)
def test_the_startup_probe_execs_where_the_sidecar_serves_no_port(spec: dict[str, Any]) -> None:
    pod = bento_pod()
    for key, value in spec.items():
        if key == "containers":
            pod["spec"]["containers"][0]["ports"] = value[0]["ports"]
        else:
            pod["spec"][key] = value
    sidecar = sidecar_of(inject(pod))
    probe = sidecar["startupProbe"]
    assert "httpGet" not in probe
    assert "ports" not in sidecar
    assert probe["exec"]["command"] == [
        "python",
        "-m",
        "sidecar",
        "probe",
        "--wait",
        "--timeout=20",
    ]
    assert probe["timeoutSeconds"] > 20


def test_credentials_only_by_secret_reference() -> None:
    env = env_of(sidecar_of(inject(bento_pod())))
    assert env["JFS_META_URL"] == {
        "secretKeyRef": {"name": "juicefs-models-credentials", "key": "metaurl"}
    }
    for entry in sidecar_of(inject(bento_pod()))["env"]:
        if entry["name"].startswith(("JFS_META", "JFS_ACCESS", "JFS_SECRET")):
            assert "value" not in entry


def test_model_mount_read_only_host_to_container_in_apps_and_later_inits() -> None:
    pod = bento_pod(
        initContainers=[
            {"name": "istio-proxy", "image": "istio/proxyv2", "restartPolicy": "Always"},
            {"name": "download-tokenizer", "image": "busybox"},
        ]
    )
    out = inject(pod)
    app_mount = out["spec"]["containers"][0]["volumeMounts"][0]
    assert app_mount == {
        "name": "juicefs-mount-dir",
        "mountPath": "/home/bentoml/bento/models",
        "readOnly": True,
        "mountPropagation": "HostToContainer",
    }
    assert [c["name"] for c in out["spec"]["initContainers"]] == [
        "istio-proxy",
        "juicefs-mount",
        "download-tokenizer",
    ]
    assert out["spec"]["initContainers"][2]["volumeMounts"] == [app_mount]
    assert "volumeMounts" not in out["spec"]["initContainers"][0]  # the mesh proxy


def test_native_istio_proxy_stays_ahead_of_our_sidecar() -> None:
    pod = bento_pod(
        initContainers=[
            {"name": "istio-init", "image": "istio/proxyv2"},
            {"name": "istio-proxy", "image": "istio/proxyv2", "restartPolicy": "Always"},
            {"name": "migrate", "image": "busybox"},
        ]
    )
    names = [c["name"] for c in inject(pod)["spec"]["initContainers"]]
    assert names == ["istio-init", "istio-proxy", "juicefs-mount", "migrate"]


@pytest.mark.parametrize(
    ("annotations", "check"),
    [
        (
            {"cache-mode": "pod", "cache-size": "100Gi"},
            lambda p: p["spec"]["volumes"][1]["emptyDir"]["sizeLimit"] == "100Gi",
        ),
        (
            {"cache-mode": "node"},
            lambda p: p["spec"]["volumes"][1] == {"name": "juicefs-cache", "emptyDir": {}},
        ),
        (
            {"models": "llama3:v2,tokenizer"},
            lambda p: env_of(sidecar_of(p))["JFS_MODELS"] == "llama3:v2,tokenizer",
        ),
        ({"warmup": "false"}, lambda p: env_of(sidecar_of(p))["JFS_WARMUP"] == "false"),
        (
            {"warmup-timeout": "1h30m"},
            lambda p: env_of(sidecar_of(p))["JFS_WARMUP_TIMEOUT_SECONDS"] == "5400",
        ),
        (
            {"sidecar-memory": "4Gi"},
            lambda p: sidecar_of(p)["resources"]["limits"]["memory"] == "4Gi",
        ),
        ({"sidecar-cpu-limit": "2"}, lambda p: sidecar_of(p)["resources"]["limits"]["cpu"] == "2"),
    ],
)
def test_valid_overrides(annotations: dict[str, str], check: Any) -> None:
    assert check(inject(annotated(**annotations)))


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        (
            {"cache-size": "lots"},
            "juicefs.bentoml.com/cache-size='lots' is invalid: expected a Kubernetes quantity",
        ),
        ({"cache-size": "10Ti"}, "expected a size between 1Gi and 2Ti"),
        ({"cache-size": "-5Gi"}, "expected a size above zero"),
        (
            {"ssd-policy": "always"},
            "ssd-policy='always' is invalid: expected 'required', 'preferred' or 'off'",
        ),
        ({"warmup": "yes"}, "warmup='yes' is invalid: expected 'true' or 'false'"),
        ({"warmup-timeout": "forever"}, "expected a duration such as 30m"),
        ({"warmup-timeout": "5s"}, "between 30s and 24h"),
        ({"models": "../../etc"}, "models='../../etc' is invalid"),
        ({"models": "Llama/x"}, "is invalid: expected a comma-separated list"),
        (
            {"volume": "other-team"},
            "volume='other-team' is invalid: expected one of models (the volumes of",
        ),
        ({"sidecar-cpu": "a lot"}, "sidecar-cpu='a lot'"),
    ],
)
def test_invalid_overrides_deny_naming_key_value_and_form(
    annotations: dict[str, str], message: str
) -> None:
    result = run(annotated(**annotations))
    assert result.outcome == "denied"
    assert message in result.reason
    assert result.response["response"]["allowed"] is False
    assert "patch" not in result.response["response"]


def test_every_invalid_override_reported_at_once() -> None:
    result = run(annotated(**{"cache-size": "x", "warmup": "maybe"}))
    assert "cache-size" in result.reason
    assert "warmup" in result.reason


@pytest.mark.parametrize("label", ["yatai.ai/bento-repository", "yatai.ai/bento-version"])
def test_missing_identity_label_denied_by_name(label: str) -> None:
    pod = bento_pod()
    del pod["metadata"]["labels"][label]
    result = run(pod)
    assert result.outcome == "denied"
    assert f"has no {label} label" in result.reason


def test_identity_label_cannot_escape_the_model_tree() -> None:
    pod = bento_pod()
    pod["metadata"]["labels"]["yatai.ai/bento-version"] = "../../secrets"
    assert run(pod).outcome == "denied"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: p["metadata"]["labels"].pop("juicefs.bentoml.com/model-store"), "lacks label"),
        (
            lambda p: p["metadata"]["labels"].update({"juicefs.bentoml.com/inject": "false"}),
            "opted out",
        ),
    ],
)
def test_unselected_and_opted_out_pods_get_no_patch(mutate: Any, reason: str) -> None:
    pod = bento_pod()
    mutate(pod)
    result = run(pod)
    assert result.outcome == "skipped"
    assert reason in result.reason
    assert result.response["response"] == {"uid": "render", "allowed": True}


@pytest.mark.parametrize(
    "namespace", ["kube-system", "kube-public", "kube-node-lease", "bento-juicefs-system"]
)
def test_system_namespaces_never_mutated(namespace: str) -> None:
    assert run(bento_pod(), namespace=namespace).outcome == "skipped"


def test_non_create_and_non_pod_requests_skipped() -> None:
    config = InjectorConfig()
    update = request_for(bento_pod(), "serving").model_copy(update={"operation": "UPDATE"})
    assert review(update, config).outcome == "skipped"
    deployment = request_for(bento_pod(), "serving").model_copy(
        update={
            "kind": request_for(bento_pod(), "serving").kind.model_copy(
                update={"group": "apps", "kind": "Deployment"}
            )
        }
    )
    assert review(deployment, config).outcome == "skipped"
    subresource = request_for(bento_pod(), "serving").model_copy(update={"sub_resource": "status"})
    assert review(subresource, config).outcome == "skipped"


def test_pod_create_without_object_is_denied() -> None:
    request = request_for(bento_pod(), "serving").model_copy(update={"object": None})
    result = review(request, InjectorConfig())
    assert result.outcome == "denied"
    assert "no object" in result.reason


def test_required_affinity_is_a_cross_product() -> None:
    terms = [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
    ]
    pod = bento_pod(
        affinity={
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}
            }
        }
    )
    out = inject(pod)
    ssd = {
        "key": "cloud.google.com/gke-ephemeral-storage-local-ssd",
        "operator": "In",
        "values": ["true"],
    }
    new_terms = out["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert new_terms[0]["matchExpressions"] == [terms[0]["matchExpressions"][0], ssd]
    assert new_terms[1]["matchFields"] == terms[1]["matchFields"]
    assert new_terms[1]["matchExpressions"] == [ssd]


def test_ssd_policy_preferred_and_off() -> None:
    preferred = inject(annotated(**{"ssd-policy": "preferred"}))["spec"]["affinity"]["nodeAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in preferred
    keys = [
        p["preference"]["matchExpressions"][0]["key"]
        for p in preferred["preferredDuringSchedulingIgnoredDuringExecution"]
    ]
    assert keys == [
        "cloud.google.com/gke-ephemeral-storage-local-ssd",
        "cloud.google.com/gke-image-streaming",
        # The node cache's warm-node term (tests/test_warm_affinity.py).
        "warm.juicefs.bentoml.com/llama3-service.v1",
    ]
    off = inject(annotated(**{"ssd-policy": "off"}))["spec"]["affinity"]["nodeAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in off


def test_image_streaming_warnings() -> None:
    pod = bento_pod()
    pod["spec"]["containers"].append(
        {"name": "sidecar", "image": "quay.io/prometheus/node-exporter"}
    )
    result = run(pod)
    assert result.warnings == [
        "sidecar: image quay.io/prometheus/node-exporter cannot use GKE Image streaming; "
        "it is pulled in full"
    ]
    assert result.response["response"]["warnings"] == result.warnings
    # Kubernetes truncates warnings past 256 characters.
    pod["spec"]["containers"][1]["image"] = "quay.io/" + "x" * 300
    assert all(len(w) <= 200 for w in run(pod).warnings)


def test_readiness_gate_appended_to_existing() -> None:
    out = inject(bento_pod(readinessGates=[{"conditionType": "example.com/warm"}]))
    assert out["spec"]["readinessGates"] == [
        {"conditionType": "example.com/warm"},
        {"conditionType": "juicefs.bentoml.com/models-ready"},
    ]


PULL_SECRETS = parse_config({"sidecar": {"imagePullSecrets": ["registry", "mirror"]}})


def test_no_pull_secrets_by_default_and_none_touched() -> None:
    assert "imagePullSecrets" not in inject(bento_pod())["spec"]
    own = [{"name": "app-registry"}]
    assert inject(bento_pod(imagePullSecrets=own))["spec"]["imagePullSecrets"] == own


def test_the_sidecars_pull_secrets_are_added_to_a_pod_without_any() -> None:
    result = run(bento_pod(), PULL_SECRETS)
    (op,) = [o for o in result.ops if o["path"].startswith("/spec/imagePullSecrets")]
    # One op for the list the pod lacked, both names in config order.
    assert op == {
        "op": "add",
        "path": "/spec/imagePullSecrets",
        "value": [{"name": "registry"}, {"name": "mirror"}],
    }


def test_the_sidecars_pull_secrets_are_appended_after_the_pods_own_without_duplicates() -> None:
    own = [{"name": "app-registry"}, {"name": "mirror"}]
    out = inject(bento_pod(imagePullSecrets=own), PULL_SECRETS)
    assert out["spec"]["imagePullSecrets"] == [*own, {"name": "registry"}]
    # Re-invoked (or a pod that already names them all): nothing to add.
    again = run(out, PULL_SECRETS)
    assert again.outcome == "unchanged"
    assert again.ops == []


def test_a_malformed_pull_secret_of_the_pods_is_left_to_the_apiserver_not_a_crash() -> None:
    """Found by the fuzzer: `name: []` made the step raise (a 500)."""
    own: list[dict[str, Any]] = [{"name": []}, {"name": "mirror"}]
    out = inject(bento_pod(imagePullSecrets=own), PULL_SECRETS)
    assert out["spec"]["imagePullSecrets"] == [*own, {"name": "registry"}]


def test_a_config_with_pull_secrets_passes_its_own_output_unchanged() -> None:
    out = inject(bento_pod(), PULL_SECRETS)
    assert [s["name"] for s in out["spec"]["imagePullSecrets"]] == ["registry", "mirror"]
    assert run(out, PULL_SECRETS).ops == []


def test_no_automount_gives_the_pod_no_token_at_all() -> None:
    out = inject(bento_pod(automountServiceAccountToken=False))
    assert not any("projected" in v for v in out["spec"]["volumes"])
    assert out["spec"]["automountServiceAccountToken"] is False


def test_status_annotation_says_what_was_injected() -> None:
    status = json.loads(inject(bento_pod())["metadata"]["annotations"][STATUS])
    assert status["sidecar"] == {"mode": "native", "name": "juicefs-mount"}
    assert status["bento"] == "llama3-service:v1"
    assert status["cache"]["mode"] == "node"
    assert status["cache"]["budget"] == "200Gi"
    assert status["profile"] == "gke"
    assert status["readinessGate"] == "juicefs.bentoml.com/models-ready"
    assert status["volumes"] == ["juicefs-mount-dir", "juicefs-cache", "juicefs-agent"]


def test_reinvocation_mounts_models_into_a_container_added_later() -> None:
    out = inject(bento_pod())
    out["spec"]["containers"].append({"name": "added-by-another-webhook", "image": "busybox"})
    out["spec"]["volumes"].append({"name": "other", "emptyDir": {}})
    again = run(out)
    assert again.outcome == "injected"
    assert again.reason == "re-invoked: added what was missing"
    assert again.ops == [
        {
            "op": "add",
            "path": "/spec/containers/1/volumeMounts",
            "value": [
                {
                    "name": "juicefs-mount-dir",
                    "mountPath": "/home/bentoml/bento/models",
                    "readOnly": True,
                    "mountPropagation": "HostToContainer",
                }
            ],
        }
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"initContainers": [{"name": "juicefs-mount", "image": "x"}]},
            "spec.initContainers already has a container named 'juicefs-mount'",
        ),
        (
            {"volumes": [{"name": "juicefs-cache", "emptyDir": {}}]},
            "spec.volumes already has a volume named 'juicefs-cache'",
        ),
    ],
)
def test_name_clashes_denied(spec: dict[str, Any], message: str) -> None:
    result = run(bento_pod(**spec))
    assert result.outcome == "denied"
    assert message in result.reason


def test_own_model_path_mount_clash_denied() -> None:
    pod = bento_pod()
    pod["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "baked", "mountPath": "/home/bentoml/bento/models/"}
    ]
    result = run(pod)
    assert result.outcome == "denied"
    assert "already mounts volume 'baked' at /home/bentoml/bento/models" in result.reason


def test_hostnetwork_warns_about_dns() -> None:
    assert any("ClusterFirstWithHostNet" in w for w in run(bento_pod(hostNetwork=True)).warnings)
    quiet = run(bento_pod(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet"))
    assert quiet.warnings == []


def test_pod_security_context_does_not_reach_the_sidecar() -> None:
    out = inject(bento_pod(securityContext={"runAsUser": 1000, "runAsNonRoot": True}))
    assert sidecar_of(out)["securityContext"]["runAsUser"] == env.SIDECAR_UID
    assert out["spec"]["securityContext"] == {"runAsUser": 1000, "runAsNonRoot": True}


def test_many_env_vars_untouched() -> None:
    env = [{"name": f"VAR_{i}", "value": str(i)} for i in range(1500)]
    pod = bento_pod()
    pod["spec"]["containers"][0]["env"] = env
    result = run(pod)
    assert all(not op["path"].startswith("/spec/containers/0/env") for op in result.ops)


def test_classic_mesh_proxy_denied_with_guidance() -> None:
    pod = bento_pod(initContainers=[{"name": "istio-init", "image": "istio/proxyv2"}])
    pod["spec"]["containers"].append({"name": "istio-proxy", "image": "istio/proxyv2"})
    result = run(pod)
    assert result.outcome == "denied"
    assert "container 'istio-proxy' is a classic (non-native) mesh proxy" in result.reason
    assert "ENABLE_NATIVE_SIDECARS" in result.reason


def test_forged_status_with_host_path_volume_denied() -> None:
    pod = bento_pod(volumes=[{"name": "juicefs-mount-dir", "hostPath": {"path": "/"}}])
    pod["metadata"]["annotations"] = {STATUS: "{}"}
    result = run(pod)
    assert result.outcome == "denied"
    assert "volume 'juicefs-mount-dir' is hostPath" in result.reason


def test_forged_status_with_own_sidecar_image_denied() -> None:
    sidecar = {"name": "juicefs-mount", "image": "evil/root", "restartPolicy": "Always"}
    pod = bento_pod(initContainers=[sidecar])
    pod["metadata"]["annotations"] = {STATUS: "{}"}
    result = run(pod)
    assert result.outcome == "denied"
    assert "container 'juicefs-mount' is not the one the injector creates" in result.reason
    assert "image" in result.reason


def test_a_sidecar_whose_startup_probe_a_mesh_rewrote_is_still_ours() -> None:
    """Istio's injector sends HTTP probes through its agent; reinvoked, we accept that."""
    out = inject(bento_pod())
    probe = out["spec"]["initContainers"][0]["startupProbe"]
    probe["httpGet"] = {"path": "/app-health/juicefs-mount/startupz", "port": 15020}
    result = run(out)
    assert result.outcome != "denied"
    assert result.ops == []


def test_forged_sidecar_with_our_image_but_its_own_command_denied() -> None:
    """Our image is not enough: a pod author's own privileged command is not our sidecar."""
    out = inject(bento_pod())
    out["spec"]["initContainers"][0]["command"] = ["nsenter", "-t", "1", "-m", "sh"]
    out["spec"]["hostPID"] = True
    result = run(out)
    assert result.outcome == "denied"
    assert "command" in result.reason


def test_apiserver_defaults_and_a_digest_pinned_image_are_still_ours() -> None:
    out = inject(bento_pod())
    sidecar = out["spec"]["initContainers"][0]
    sidecar["terminationMessagePath"] = "/dev/termination-log"
    sidecar["startupProbe"]["successThreshold"] = 1
    for entry in sidecar["env"]:
        if entry.get("value") == "":
            del entry["value"]  # dropped on the way through the apiserver
    sidecar["image"] = sidecar["image"].rsplit(":", 1)[0] + "@sha256:" + "a" * 64
    assert run(out).ops == []


def test_stripped_restart_policy_denied_on_reinvocation() -> None:
    out = inject(bento_pod())
    del out["spec"]["initContainers"][0]["restartPolicy"]
    result = run(out)
    assert result.outcome == "denied"
    assert "lost restartPolicy: Always" in result.reason


def test_status_not_rewritten_once_injected() -> None:
    out = inject(bento_pod())
    changed = parse_config({"juicefs": {"defaultCacheSize": "30Gi"}})
    assert run(out, changed).ops == []


def test_limit_below_request_both_set_denied() -> None:
    result = run(annotated(**{"sidecar-cpu": "500m", "sidecar-cpu-limit": "250m"}))
    assert result.outcome == "denied"
    assert "sidecar-cpu-limit='250m' is below the cpu request '500m'" in result.reason


def test_raised_request_lifts_the_default_limit() -> None:
    sidecar = sidecar_of(inject(annotated(**{"sidecar-memory": "4Gi"})))
    assert sidecar["resources"]["limits"]["memory"] == "4Gi"


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"sidecar-memory": "0.5"}, "a whole number of bytes"),
        ({"cache-size": "1.5"}, "a whole number of bytes"),
        ({"cache-size": ""}, "cache-size='' is invalid"),
    ],
)
def test_byte_quantities_must_be_whole(annotations: dict[str, str], message: str) -> None:
    result = run(annotated(**annotations))
    assert result.outcome == "denied"
    assert message in result.reason


def test_classic_mode_keeps_kubectl_defaulting_to_the_app() -> None:
    config = parse_config({"cluster": {"kubernetesVersion": "1.28"}})
    out = inject(bento_pod(), config)
    assert out["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "main"


def test_existing_constraint_on_the_ssd_label_is_left_alone() -> None:
    key = "cloud.google.com/gke-ephemeral-storage-local-ssd"
    terms = [{"matchExpressions": [{"key": key, "operator": "DoesNotExist"}]}]
    required = {"nodeSelectorTerms": terms}
    pod = bento_pod(
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}
    )
    result = run(pod)
    assert (
        f"required node affinity term 0 already constrains {key}; left as written"
        in result.warnings
    )
    assert not any("nodeSelectorTerms/0" in op["path"] for op in result.ops)


def ssd_status(pod: dict[str, Any]) -> str:
    status = json.loads(inject(pod)["metadata"]["annotations"][STATUS])
    affinity: dict[str, str] = status["affinity"]
    return affinity["cloud.google.com/gke-ephemeral-storage-local-ssd=true"]


def test_status_reports_a_term_left_as_written_not_required() -> None:
    key = "cloud.google.com/gke-ephemeral-storage-local-ssd"
    own = {"matchExpressions": [{"key": key, "operator": "DoesNotExist"}]}
    other = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
    for terms, expected in (
        ([own], "left as written"),
        ([other, own], "required, except term 1 (left as written)"),
        ([other], "required"),
    ):
        required = {"nodeSelectorTerms": terms}
        pod = bento_pod(
            affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}
        )
        assert ssd_status(pod) == expected
    assert ssd_status(annotated(**{"ssd-policy": "preferred"})) == "preferred"


def test_status_lists_the_volumes_the_pod_got() -> None:
    token = "/var/run/secrets/kubernetes.io/serviceaccount"
    projected = {"sources": [{"serviceAccountToken": {"path": "token"}}]}
    pod = bento_pod(volumes=[{"name": "kube-api-access-x7k2p", "projected": projected}])
    pod["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "kube-api-access-x7k2p", "mountPath": token}
    ]
    status = json.loads(inject(pod)["metadata"]["annotations"][STATUS])
    assert status["volumes"] == ["juicefs-mount-dir", "juicefs-cache", "juicefs-agent"]


def test_profile_without_ssd_label_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="has no ssdNodeLabel"):
        parse_config({"cluster": {"platformProfile": "aks"}})
    eks = parse_config({"cluster": {"platformProfile": "eks"}})
    out = inject(bento_pod(), eks)
    terms = out["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"] == [
        {"key": "karpenter.k8s.aws/instance-local-nvme", "operator": "Exists"}
    ]


@pytest.mark.parametrize(
    "value", ["1e999999", "1e1000000", "\u0662\u0660Gi", "9" * 5000, "20Gi" * 10]
)
def test_hostile_quantities_are_rejected_fast(value: str) -> None:
    pod = annotated(**{"sidecar-cpu": value, "cache-size": value, "warmup-timeout": value})
    result = run(pod)
    assert result.outcome == "denied"
    assert len(result.reason) < 1000


def test_opt_out_label_is_exact() -> None:
    pod = bento_pod()
    pod["metadata"]["labels"]["juicefs.bentoml.com/inject"] = "False"
    result = run(pod)
    assert result.outcome == "denied"
    assert "(lowercase)" in result.reason


def test_memory_cache_is_charged_to_memory_not_ephemeral_storage() -> None:
    config = parse_config({"cache": {"mode": "pod"}, "volumes": {"cacheMedium": "Memory"}})
    resources = sidecar_of(inject(annotated(**{"cache-size": "1Gi"}), config))["resources"]
    assert "ephemeral-storage" not in resources["requests"]
    assert resources["requests"]["memory"] == str(512 * 2**20 + 2**30)
    assert resources["limits"]["memory"] == str(2 * 2**30 + 2**30)


# -- the cache: the pod's emptyDir, or the node cache -----------------------------------

NODE_CACHE = "/mnt/stateful_partition/kube-ephemeral-ssd/bento-juicefs"


def volume_named(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(next(v for v in pod["spec"]["volumes"] if v["name"] == name))


def node_cache_path(pod: dict[str, Any]) -> str:
    """The node cache directory the status says the node agent bind-mounts for the pod."""
    return str(json.loads(pod["metadata"]["annotations"][STATUS])["cache"]["path"])


def test_node_cache_is_a_mount_point_for_the_node_agent_mounted_only_by_the_sidecar() -> None:
    out = inject(bento_pod(initContainers=[{"name": "setup", "image": "busybox"}]))
    # The node agent bind-mounts the volume's directory of the node cache here.
    assert volume_named(out, "juicefs-cache") == {"name": "juicefs-cache", "emptyDir": {}}
    assert node_cache_path(out) == f"{NODE_CACHE}/models"
    sidecar = sidecar_of(out)
    assert {
        "name": "juicefs-cache",
        "mountPath": "/var/lib/juicefs/cache",
        "mountPropagation": "HostToContainer",
    } in sidecar["volumeMounts"]
    others = out["spec"]["initContainers"] + out["spec"]["containers"]
    mounting = [
        c["name"]
        for c in others
        if any(m["name"] == "juicefs-cache" for m in c.get("volumeMounts") or [])
    ]
    assert mounting == ["juicefs-mount"]
    # The node has its own budget: no per-pod ephemeral-storage request.
    assert "ephemeral-storage" not in sidecar["resources"]["requests"]
    env = env_of(sidecar)
    assert env["JFS_CACHE_MODE"] == "node"
    assert env["JFS_NODE_CACHE_BUDGET_MIB"] == str(200 * 1024)
    assert env["JFS_CACHE_SIZE_MIB"] == str(int(200 * 1024 * 0.9))
    assert env["JFS_CACHE_SCAN_SECONDS"] == "10"


def test_the_volume_annotation_picks_that_volumes_node_cache_directory() -> None:
    config = parse_config({"juicefs": {"allowedVolumes": ["models", "vision"]}})
    out = inject(annotated(volume="vision"), config)
    assert node_cache_path(out) == f"{NODE_CACHE}/vision"


@pytest.mark.parametrize(
    ("profile", "path"),
    [
        ("eks", "/mnt/k8s-disks/0/bento-juicefs/models"),
        ("aks", "/mnt/bento-juicefs/models"),
    ],
)
def test_each_ssd_profile_names_its_node_cache_directory(profile: str, path: str) -> None:
    config = parse_config(
        {
            "cluster": {"platformProfile": profile},
            "scheduling": {"ssdNodeLabel": {"key": "example.com/nvme"}},
        }
    )
    assert config.cache_mode == "node"
    assert node_cache_path(inject(bento_pod(), config)) == path


def test_the_none_profile_defaults_to_the_pod_cache() -> None:
    config = parse_config(
        {"cluster": {"platformProfile": "none"}, "scheduling": {"ssdPolicy": "off"}}
    )
    assert config.cache_mode == "pod"
    out = inject(bento_pod(), config)
    assert volume_named(out, "juicefs-cache")["emptyDir"] == {"sizeLimit": "20Gi"}
    assert sidecar_of(out)["resources"]["requests"]["ephemeral-storage"] == "20Gi"
    assert env_of(sidecar_of(out))["JFS_CACHE_MODE"] == "pod"
    assert "JFS_NODE_CACHE_BUDGET_MIB" not in env_of(sidecar_of(out))


def test_the_config_path_overrides_the_profiles() -> None:
    config = parse_config({"cache": {"nodePath": "/var/nvme/jfs"}})
    out = inject(bento_pod(), config)
    assert node_cache_path(out) == "/var/nvme/jfs/models"


def test_pod_cache_by_annotation_requests_its_size() -> None:
    out = inject(annotated(**{"cache-mode": "pod", "cache-size": "30Gi"}))
    assert volume_named(out, "juicefs-cache")["emptyDir"] == {"sizeLimit": "30Gi"}
    assert sidecar_of(out)["resources"]["requests"]["ephemeral-storage"] == "30Gi"
    status = json.loads(out["metadata"]["annotations"][STATUS])
    assert status["cache"] == {
        "mode": "pod",
        "size": "30Gi",
        "medium": "node-local disk (emptyDir)",
    }


def test_cache_size_on_the_node_cache_is_ignored_with_a_warning_but_still_validated() -> None:
    result = run(annotated(**{"cache-size": "40Gi"}))
    assert result.outcome == "injected"
    assert any("cache-size is ignored" in w and "cache-mode=pod" in w for w in result.warnings)
    bad = run(annotated(**{"cache-size": "lots"}))
    assert bad.outcome == "denied"
    assert "cache-size='lots'" in bad.reason


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("shared", "cache-mode='shared' is invalid: expected 'pod' or 'node'"),
        ("Node", "expected 'pod' or 'node'"),
    ],
)
def test_invalid_cache_mode_denied(value: str, message: str) -> None:
    result = run(annotated(**{"cache-mode": value}))
    assert result.outcome == "denied"
    assert message in result.reason


def test_node_cache_without_a_directory_denied() -> None:
    config = parse_config(
        {"cluster": {"platformProfile": "none"}, "scheduling": {"ssdPolicy": "off"}}
    )
    result = run(annotated(**{"cache-mode": "node"}), config)
    assert result.outcome == "denied"
    assert "needs a node cache directory" in result.reason
    assert "cache.nodePath" in result.reason


@pytest.mark.parametrize("key", ["initContainers", "containers", "ephemeralContainers"])
def test_a_container_of_the_pods_that_mounts_the_cache_is_denied(key: str) -> None:
    pod = bento_pod()
    mounts = [{"name": "juicefs-cache", "mountPath": "/cache"}]
    mount = {"name": "peek", "image": "busybox", "volumeMounts": mounts}
    pod["spec"].setdefault(key, []).append(mount)
    result = run(pod)
    assert result.outcome == "denied"
    assert f"container 'peek' in spec.{key} mounts volume 'juicefs-cache'" in result.reason


def test_a_container_added_after_injection_that_mounts_the_cache_is_denied() -> None:
    out = inject(bento_pod())
    mount = [{"name": "juicefs-cache", "mountPath": "/cache"}]
    out["spec"]["containers"].append({"name": "later", "image": "busybox", "volumeMounts": mount})
    result = run(out)
    assert result.outcome == "denied"
    assert "only juicefs-mount may mount" in result.reason


@pytest.mark.parametrize("cache_mode", ["node", "pod"])
@pytest.mark.parametrize(
    "host_path",
    [
        {"path": "/", "type": "DirectoryOrCreate"},
        {"path": f"{NODE_CACHE}/models/..", "type": "DirectoryOrCreate"},
        {"path": f"{NODE_CACHE}/models", "type": "DirectoryOrCreate"},
        {"path": f"{NODE_CACHE}/models"},
    ],
)
def test_forged_status_vouches_for_no_host_path(host_path: dict[str, str], cache_mode: str) -> None:
    """Not even the configured node cache: the node agent mounts it, never the pod."""
    out = inject(annotated(**{"cache-mode": cache_mode}))
    volume = next(v for v in out["spec"]["volumes"] if v["name"] == "juicefs-cache")
    del volume["emptyDir"]
    volume["hostPath"] = host_path
    result = run(out)
    assert result.outcome == "denied"
    assert "volume 'juicefs-cache' is hostPath, not what the injector creates" in result.reason
    assert "cannot be set by hand" in result.reason


def test_forged_status_with_a_cache_of_two_kinds_denied() -> None:
    out = inject(bento_pod())
    volume = next(v for v in out["spec"]["volumes"] if v["name"] == "juicefs-cache")
    volume["hostPath"] = {"path": f"{NODE_CACHE}/models"}
    result = run(out)
    assert result.outcome == "denied"
    assert "volume 'juicefs-cache' is emptyDir/hostPath" in result.reason


@pytest.mark.parametrize("name", ["juicefs-mount-dir", "juicefs-agent"])
def test_forged_status_with_a_host_path_under_our_other_names_denied(name: str) -> None:
    pod = bento_pod(volumes=[{"name": name, "hostPath": {"path": f"{NODE_CACHE}/models"}}])
    pod["metadata"]["annotations"] = {STATUS: "{}"}
    result = run(pod)
    assert result.outcome == "denied"
    assert f"volume {name!r} is hostPath" in result.reason


def test_our_own_node_cache_output_is_accepted_again() -> None:
    out = inject(bento_pod())
    again = run(out)
    assert again.outcome == "unchanged"
    assert again.ops == []


# --- the sidecar's metrics port ---------------------------------------------------------


def metrics_env(sidecar: dict[str, Any]) -> str:
    (entry,) = [e for e in sidecar["env"] if e["name"] == "JFS_METRICS_PORT"]
    return str(entry["value"])


def test_the_sidecar_declares_its_metrics_port_and_is_told_it() -> None:
    sidecar = sidecar_of(inject(bento_pod()))
    assert sidecar["ports"] == [{"name": "metrics", "containerPort": 9465, "protocol": "TCP"}]
    assert metrics_env(sidecar) == "9465"
    other = parse_config({"sidecar": {"metricsPort": 9500}})
    assert sidecar_of(inject(bento_pod(), other))["ports"][0]["containerPort"] == 9500


@pytest.mark.parametrize(
    ("spec", "config"),
    [
        ({}, {"sidecar": {"metricsPort": 0}}),
        # The port would be the node's, and a declared one a hostPort.
        ({"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"}, {}),
    ],
)
def test_no_metrics_port_without_a_warning(spec: dict[str, Any], config: dict[str, Any]) -> None:
    result = run(bento_pod(**spec), parse_config(config))
    assert result.warnings == []
    sidecar = sidecar_of(inject(bento_pod(**spec), parse_config(config)))
    assert "ports" not in sidecar
    assert metrics_env(sidecar) == "0"


def test_an_app_that_declares_the_metrics_port_keeps_it_with_a_warning() -> None:
    app = {
        "name": "main",
        "image": "us-docker.pkg.dev/p/r/llama:1",
        "ports": [{"containerPort": 9465}],
    }
    pod = bento_pod(containers=[app])
    (warning,) = run(pod).warnings
    assert "serves no Prometheus metrics" in warning
    assert "container 'main' declares port 9465" in warning
    sidecar = sidecar_of(inject(pod))
    assert "ports" not in sidecar
    assert metrics_env(sidecar) == "0"
    # UDP on the same number does not clash with the sidecar's TCP.
    app["ports"] = [{"containerPort": 9465, "protocol": "UDP"}]
    assert run(bento_pod(containers=[app])).warnings == []


def test_reinjecting_a_pod_with_our_metrics_port_changes_nothing() -> None:
    once = inject(bento_pod())
    result = run(once)
    assert result.outcome == "unchanged", result.reason
    assert result.warnings == []


# --- the sidecar passes Pod Security `restricted` -----------------------------------------
# The node agent opens /dev/fuse and mounts for the pod; the sidecar reaches it
# through a socket in its own emptyDir, and holds no Kubernetes credential and
# no host path.

AGENT = "juicefs-agent"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SIDECAR_CONFIGS = {
    "native, node cache": InjectorConfig(),
    "classic": parse_config({"cluster": {"kubernetesVersion": "1.28"}}),
    "pod cache": parse_config({"cache": {"mode": "pod"}}),
}


@pytest.mark.parametrize("config", SIDECAR_CONFIGS.values(), ids=SIDECAR_CONFIGS.keys())
def test_the_sidecar_passes_restricted(config: InjectorConfig) -> None:
    pod = inject(bento_pod(), config)
    assert restricted_violations(pod, sidecar_of(pod)) == []


def test_the_restricted_check_is_not_vacuous() -> None:
    """A privileged root container with a host path fails it."""
    pod = bento_pod(volumes=[{"name": "cache", "hostPath": {"path": "/mnt"}}])
    container = {"name": "root", "securityContext": {"privileged": True, "runAsUser": 0}}
    problems = restricted_violations(pod, container)
    assert "privileged" in problems
    assert "runAsNonRoot != true" in problems
    assert "volume cache is hostPath" in problems


def test_the_security_context_is_exactly_the_restricted_one() -> None:
    assert sidecar_of(inject(bento_pod()))["securityContext"] == {
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
    sidecar = sidecar_of(inject(pod))
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
    out = inject(pod)
    for key in ("initContainers", "containers"):
        for container in out["spec"].get(key) or []:
            assert restricted_violations(out, container) == [], container["name"]


@pytest.mark.parametrize("config", SIDECAR_CONFIGS.values(), ids=SIDECAR_CONFIGS.keys())
def test_no_host_path_in_either_cache_mode(config: InjectorConfig) -> None:
    for cache_mode in ("pod", "node"):
        out = inject(annotated(**{"cache-mode": cache_mode}), config)
        assert [v for v in out["spec"]["volumes"] if "hostPath" in v] == []


def test_the_agent_volume_is_a_small_tmpfs() -> None:
    volume = volume_named(inject(bento_pod()), AGENT)
    assert volume == {"name": AGENT, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}


@pytest.mark.parametrize("config", SIDECAR_CONFIGS.values(), ids=SIDECAR_CONFIGS.keys())
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
    out = inject(pod)
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
    ours = {"juicefs-mount-dir", "juicefs-cache", AGENT}
    assert [v for v in out["spec"]["volumes"] if v["name"] in ours and "emptyDir" not in v] == []
    assert "JFS_TOKEN_DIR" not in env_of(sidecar)


@pytest.mark.parametrize("config", SIDECAR_CONFIGS.values(), ids=SIDECAR_CONFIGS.keys())
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


@pytest.mark.parametrize("key", ["containers", "initContainers"])
def test_an_app_container_mounting_the_agent_volume_is_denied(key: str) -> None:
    pod = bento_pod()
    pod["spec"].setdefault(key, [{"name": "main", "image": "busybox"}])
    pod["spec"][key][0]["volumeMounts"] = [{"name": AGENT, "mountPath": "/agent"}]
    result = run(pod)
    assert result.outcome == "denied"
    assert (
        f"container 'main' in spec.{key} mounts volume 'juicefs-agent', the node agent's "
        "socket for the sidecar, which only juicefs-mount may mount" in result.reason
    )


def test_a_pods_own_volume_named_like_the_agent_volume_clashes() -> None:
    result = run(bento_pod(volumes=[{"name": AGENT, "emptyDir": {}}]))
    assert result.outcome == "denied"
    assert "spec.volumes already has a volume named 'juicefs-agent'" in result.reason


def test_the_agent_volume_name_is_configurable() -> None:
    config = parse_config({"volumes": {"agentName": "agent"}})
    assert owned_names(config).agent_volume == "agent"
    out = inject(bento_pod(), config)
    assert "agent" in {v["name"] for v in out["spec"]["volumes"]}
    assert any(m["name"] == "agent" for m in sidecar_of(out)["volumeMounts"])


@pytest.mark.parametrize("config", SIDECAR_CONFIGS.values(), ids=SIDECAR_CONFIGS.keys())
def test_its_own_output_is_accepted_again_unchanged(config: InjectorConfig) -> None:
    again = run(inject(bento_pod(), config), config)
    assert again.outcome == "unchanged"
    assert again.ops == []


def test_the_status_says_the_node_agent_serves_the_node_cache() -> None:
    status = json.loads(inject(bento_pod())["metadata"]["annotations"][STATUS])
    # Always unprivileged: the status carries no flag for it.
    assert status["sidecar"] == {"name": "juicefs-mount", "mode": "native"}
    assert status["cache"]["medium"] == "node-local SSD (shared, read-only through the node agent)"
