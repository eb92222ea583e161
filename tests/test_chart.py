"""The Helm chart (charts/bento-juicefs) against the kustomize overlays.

`helm template` (the pinned Helm, hack/binaries/helm) and `kubectl kustomize`
(the pinned kubectl) render from the same tree; both are built or taken from
the binaries cache by devcluster.binaries.ensure_binaries.

Equivalence, per profile (gke: the chart's defaults against
manifests/overlays/gke; eks and aks: `--set profile=X` against overlays/X):
the same set of objects by (kind, name, namespace), and each object equal
after this normalisation and nothing else (the chart's `helm test` hooks,
templates/tests/, are left out: the overlays have no `helm test`; the tests
under "helm test" below check them):

- the four labels the chart adds to every object's metadata.labels are
  removed from metadata.labels (and metadata.labels with it when that leaves
  it empty): helm.sh/chart, app.kubernetes.io/managed-by,
  app.kubernetes.io/instance, app.kubernetes.io/version (HELM_LABELS in tests/kit/chart.py).
  Selectors and pod template labels are compared as they are;
- the ConfigMap's config.yaml (a YAML document inside a string) is compared
  parsed, so its key order, quoting and comments do not count;
- the pod template annotation checksum/config (CHECKSUM in tests/kit/chart.py)
  of the Deployment and the DaemonSet is removed (and annotations with it
  when that leaves it empty): the overlays cannot hash their config;
- everything else is compared as parsed YAML, i.e. key order and YAML
  formatting (flow or block style, comments) do not count; values do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks import load
from common.warm import STARTUP_TAINT
from injector.config import InjectorConfig, parse_config
from injector.namespaces import credential_secret_names
from tests.helpers import bento_pod, inject, restricted_violations, run
from tests.kit.chart import (
    CERT_MANAGER,
    CHART,
    CHECKSUM,
    CONFIG_MAP,
    DEPLOYMENT,
    HELM_LABELS,
    HOOK,
    NAMESPACE,
    OVERLAYS,
    PROFILES,
    REPO,
    Key,
    dump,
    helm,
    kustomize,
    normalise,
    parse_objects,
    pod_spec,
    run_tool,
    tool_binaries,
    without_hooks,
)
from tests.rbac_docs import Atom, documented

WEBHOOK = ("MutatingWebhookConfiguration", "bento-juicefs-injector", "")
SIDECAR_REQUIRED = ("ValidatingAdmissionPolicy", "bento-juicefs-sidecar-required", "")
NETWORK_POLICY = ("NetworkPolicy", "bento-juicefs-injector", NAMESPACE)
# Every label the webhook's selectors read, changed from the injector's defaults.
LABELS = (
    "config.labels.namespaceOptIn=example.com/bento-models",
    "config.labels.namespaceOptInValue=on",
    "config.labels.modelStore=example.com/store",
    "config.labels.modelStoreValue=jfs",
    "config.labels.inject=example.com/inject",
    "config.webhook.excludedNamespaces={kube-system,platform}",
)
DASHBOARD_CONFIG_MAP = ("ConfigMap", "bento-juicefs-dashboard", NAMESPACE)
DAEMON_SET = ("DaemonSet", "bento-juicefs-node-agent", NAMESPACE)


def kustomize_cert_manager(profile: str, work: Path) -> dict[Key, dict[str, Any]]:
    """A user's overlay: the profile's, the cert-manager component, its config (installation.md)."""
    config = config_of(kustomize(profile))
    config["server"] = {"selfSigned": False}
    config["webhook"] = {"manageCaBundle": False}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIG_MAP[1], "namespace": NAMESPACE},
        "data": {"config.yaml": yaml.safe_dump(config)},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config_map))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        # kustomize refuses absolute paths; relative ones may leave the root.
        "resources": [os.path.relpath(OVERLAYS / profile, work)],
        "components": [os.path.relpath(CERT_MANAGER, work)],
        "patches": [{"path": "config.yaml"}],
    }
    (work / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return parse_objects(run_tool([str(tool_binaries()["kubectl"]), "kustomize", str(work)]))


def config_of(objects: dict[Key, dict[str, Any]]) -> dict[str, Any]:
    data = yaml.safe_load(objects[CONFIG_MAP]["data"]["config.yaml"])
    assert isinstance(data, dict)
    return data


def node_cache(spec: dict[str, Any]) -> tuple[str, str]:
    (volume,) = [v for v in spec["volumes"] if v["name"] == "node-cache"]
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "node-cache"]
    return volume["hostPath"]["path"], mount["mountPath"]


def _sets(profile: str) -> Iterable[str]:
    return () if profile == "gke" else (f"profile={profile}",)


# --- the chart and the overlays render the same objects -----------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_chart_and_overlay_render_the_same_objects(profile: str) -> None:
    chart, overlay = without_hooks(helm(*_sets(profile))), kustomize(profile)
    assert sorted(chart) == sorted(overlay)
    for key in sorted(chart):
        assert dump(normalise(chart[key])) == dump(normalise(overlay[key])), (
            f"{profile}: {key} differs between the chart and manifests/overlays/{profile}"
        )


@pytest.mark.parametrize("profile", PROFILES)
def test_chart_with_cert_manager_and_the_component_render_the_same_objects(
    profile: str, tmp_path: Path
) -> None:
    chart = without_hooks(helm(*_sets(profile), "certificates.mode=certManager"))
    overlay = kustomize_cert_manager(profile, tmp_path)
    assert sorted(chart) == sorted(overlay)
    assert ("Certificate", "bento-juicefs-injector-serving", NAMESPACE) in chart
    for key in sorted(chart):
        assert dump(normalise(chart[key])) == dump(normalise(overlay[key])), (
            f"{profile}: {key} differs between the chart and components/cert-manager"
        )


def test_the_gke_overlay_is_the_base() -> None:
    base = parse_objects(
        run_tool([str(tool_binaries()["kubectl"]), "kustomize", str(REPO / "manifests/base")])
    )
    assert base == kustomize("gke")


def test_helm_lint_passes() -> None:
    out = run_tool([str(tool_binaries()["helm"]), "lint", "--strict", str(CHART)])
    assert "0 chart(s) failed" in out


def test_only_the_helm_labels_are_ignored() -> None:
    chart = helm()
    for key, obj in chart.items():
        labels = obj["metadata"].get("labels", {})
        assert set(labels) >= HELM_LABELS, f"{key} lacks Helm's labels"
    # A label the normalisation must not hide.
    changed = normalise(chart[CONFIG_MAP])
    changed["metadata"]["labels"] = {"app.kubernetes.io/name": "x"}
    assert normalise(changed) != normalise(chart[CONFIG_MAP])


# --- what the profile values change ------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_sets_config_node_selector_and_host_path(profile: str) -> None:
    objects = helm(*_sets(profile))
    config = parse_config(config_of(objects), f"chart {profile}")
    assert config.cluster.platform_profile == profile
    spec = pod_spec(objects, DAEMON_SET)
    # The node agent goes where the injector's SSD affinity sends Bentos, and
    # keeps the directory the injector mounts into sidecars.
    label = config.ssd_node_label
    assert label is not None
    if label.value is None:
        assert "nodeSelector" not in spec
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"] == [{"matchExpressions": [label.expression()]}]
    else:
        assert spec["nodeSelector"] == {label.key: label.value}
        assert "affinity" not in spec
    assert node_cache(spec) == (config.node_cache_path, config.node_cache_path)


def test_eks_and_aks_differ_from_gke() -> None:
    gke = pod_spec(helm(), DAEMON_SET)
    assert gke["nodeSelector"] == {"cloud.google.com/gke-ephemeral-storage-local-ssd": "true"}
    assert node_cache(gke)[0] == "/mnt/stateful_partition/kube-ephemeral-ssd/bento-juicefs"

    eks = pod_spec(helm("profile=eks"), DAEMON_SET)
    assert "nodeSelector" not in eks
    expr = eks["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert expr["nodeSelectorTerms"][0]["matchExpressions"] == [
        {"key": "karpenter.k8s.aws/instance-local-nvme", "operator": "Exists"}
    ]
    assert node_cache(eks) == ("/mnt/k8s-disks/0/bento-juicefs",) * 2
    assert config_of(helm("profile=eks"))["cluster"]["platformProfile"] == "eks"

    aks_objects = helm("profile=aks")
    aks = pod_spec(aks_objects, DAEMON_SET)
    assert aks["nodeSelector"] == {"juicefs.bentoml.com/local-ssd": "true"}
    assert node_cache(aks) == ("/mnt/bento-juicefs",) * 2
    aks_config = config_of(aks_objects)
    assert aks_config["cluster"]["platformProfile"] == "aks"
    # The aks profile names no SSD label; without one the injector refuses to start.
    assert aks_config["scheduling"]["ssdNodeLabel"] == {
        "key": "juicefs.bentoml.com/local-ssd",
        "value": "true",
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("profile=openshift", "value must be one of 'gke', 'eks', 'aks'"),
        ("profle=eks", "additional properties 'profle' not allowed"),
        ("certificates.mode=vault", "value must be one of 'selfSigned', 'certManager'"),
        ("cache.mode=disk", "value must be one of '', 'pod', 'node'"),
        ("nodeAgent.kubeletRoot=var/lib/kubelet", "nodeAgent/kubeletRoot"),
        ("nodeAgent.kubeletRoot=/", "nodeAgent/kubeletRoot"),
        ("image.digest=sha256:abc", "image/digest"),
        ("image.digest=1.2.3", "image/digest"),
    ],
)
def test_values_schema_refuses(value: str, message: str) -> None:
    args = [str(tool_binaries()["helm"]), "template", "x", str(CHART), "--set", value]
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_node_path_ssd_label_cache_mode_and_config_map() -> None:
    objects = helm(
        "profile=eks",
        "cache.nodePath=/var/lib/nvme/bento-juicefs",
        "cache.mode=node",
        "ssdNodeLabel.key=example.com/nvme",
        "ssdNodeLabel.value=yes",
        "config.scheduling.ssdPolicy=preferred",
        "config.juicefs.bufferSizeMib=512",
    )
    data = config_of(objects)
    config = parse_config(data, "chart")
    assert config.cache.mode == "node"
    assert config.node_cache_path == "/var/lib/nvme/bento-juicefs"
    assert config.scheduling.ssd_policy == "preferred"
    assert config.juicefs.buffer_size_mib == 512
    assert str(config.ssd_node_label) == "example.com/nvme=yes"
    assert data["cluster"] == {"kubernetesVersion": "1.30", "platformProfile": "eks"}
    spec = pod_spec(objects, DAEMON_SET)
    assert spec["nodeSelector"] == {"example.com/nvme": "yes"}
    assert "affinity" not in spec
    assert node_cache(spec) == ("/var/lib/nvme/bento-juicefs",) * 2


def test_image_replicas_resources_and_node_agent_args() -> None:
    objects = helm(
        "image.repository=registry.example.com/bj",
        "image.tag=1.2.3",
        "image.pullPolicy=Always",
        "injector.replicas=3",
        "injector.resources.limits.memory=512Mi",
        "nodeAgent.resyncSeconds=30",
        "nodeAgent.evictAfterSeconds=7200",
        "nodeAgent.extraArgs={--log-level,debug}",
    )
    deployment = objects[("Deployment", "bento-juicefs-injector", NAMESPACE)]
    assert deployment["spec"]["replicas"] == 3
    for key in (("Deployment", "bento-juicefs-injector", NAMESPACE), DAEMON_SET):
        container = pod_spec(objects, key)["containers"][0]
        assert container["image"] == "registry.example.com/bj:1.2.3"
        assert container["imagePullPolicy"] == "Always"
    injector = pod_spec(objects, ("Deployment", "bento-juicefs-injector", NAMESPACE))
    assert injector["containers"][0]["resources"]["limits"] == {"memory": "512Mi"}
    agent = pod_spec(objects, DAEMON_SET)["containers"][0]
    assert agent["args"] == [
        "nodeagent",
        "run",
        "--config",
        "/etc/bento-juicefs/config.yaml",
        "--kubelet-root",
        "/var/lib/kubelet",
        "--resync-seconds",
        "30",
        "--evict-after-seconds",
        "7200",
        "--log-level",
        "debug",
    ]


def injected_pod(config: InjectorConfig) -> dict[str, Any]:
    """A Bento pod, labelled as this config selects, as the injector with it injects it."""
    pod = bento_pod()
    keys = config.labels
    pod["metadata"]["labels"] = {
        keys.model_store: keys.model_store_value,
        keys.bento_repository: "llama3-service",
        keys.bento_version: "v1",
    }
    return inject(pod, config)


def injected_sidecar(config: InjectorConfig) -> dict[str, Any]:
    """The juicefs-mount container the injector with this config adds to a Bento pod."""
    containers = injected_pod(config)["spec"]["initContainers"]
    (sidecar,) = [c for c in containers if c["name"] == config.sidecar.container_name]
    assert isinstance(sidecar, dict)
    return sidecar


def images(objects: dict[Key, dict[str, Any]]) -> tuple[str, str, str]:
    """The injector's, the node agent's and the injected sidecar's image."""
    sidecar = injected_sidecar(parse_config(config_of(objects)))
    return (
        pod_spec(objects, DEPLOYMENT)["containers"][0]["image"],
        pod_spec(objects, DAEMON_SET)["containers"][0]["image"],
        sidecar["image"],
    )


def test_the_sidecar_image_follows_the_chart_image() -> None:
    # The default: the chart's appVersion, which is also the injector's own
    # default (what `python -m injector render` and the golden files use).
    assert images(helm()) == (InjectorConfig().sidecar.image,) * 3
    # `helm upgrade --set image.tag=X` moves the sidecars too.
    moved = helm(
        "image.repository=registry.example.com/bj", "image.tag=1.2.3", "image.pullPolicy=Always"
    )
    assert images(moved) == ("registry.example.com/bj:1.2.3",) * 3
    # The pull policy is the chart's pods' only: a sidecar's pull is on every cold start.
    assert injected_sidecar(parse_config(config_of(moved)))["imagePullPolicy"] == "IfNotPresent"
    # A digest wins over the tag, for all three.
    digest = "sha256:" + "0123456789abcdef" * 4
    pinned = helm("image.tag=1.2.3", f"image.digest={digest}")
    assert images(pinned) == (f"ghcr.io/bentoml/bento-juicefs-sidecar@{digest}",) * 3
    # An explicit config.sidecar.image wins for the sidecar only.
    mirrored = helm(
        "image.tag=1.2.3",
        "config.sidecar.image=mirror.example.com/bj-sidecar:7",
        "config.sidecar.imagePullPolicy=Always",
    )
    sidecar = injected_sidecar(parse_config(config_of(mirrored)))
    assert (sidecar["image"], sidecar["imagePullPolicy"]) == (
        "mirror.example.com/bj-sidecar:7",
        "Always",
    )
    assert images(mirrored)[:2] == ("ghcr.io/bentoml/bento-juicefs-sidecar:1.2.3",) * 2


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) selects these labels."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        if operator == "In" and labels.get(key) not in expression["values"]:
            return False
        if operator == "NotIn" and key in labels and labels[key] in expression["values"]:
            return False
        assert operator in {"In", "NotIn"}, operator
    return True


def test_webhook_failure_policy_and_timeout_values() -> None:
    (hook,) = helm()[WEBHOOK]["webhooks"]
    assert (hook["failurePolicy"], hook["timeoutSeconds"]) == ("Ignore", 5)
    # What `make bench-load` holds the slowest review against.
    assert load.webhook_timeout_seconds() == hook["timeoutSeconds"]
    (hook,) = helm("webhook.failurePolicy=Fail", "webhook.timeoutSeconds=12")[WEBHOOK]["webhooks"]
    assert (hook["failurePolicy"], hook["timeoutSeconds"]) == ("Fail", 12)


def test_the_charts_copy_of_the_injectors_defaults_is_the_injectors(tmp_path: Path) -> None:
    """bento-juicefs.injectorDefaults and fixedConfig (_helpers.tpl) against injector/config.py."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-defaults.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: defaults}\ndata:\n"
        '  defaults: {{ include "bento-juicefs.injectorDefaults" . | toJson | quote }}\n'
        '  fixed: {{ include "bento-juicefs.fixedConfig" . | toJson | quote }}\n'
    )
    text = run_tool([str(tool_binaries()["helm"]), "template", "x", str(chart)])
    data = parse_objects(text)[("ConfigMap", "defaults", "")]["data"]
    injector = InjectorConfig().model_dump(mode="json", by_alias=True)
    for name in ("defaults", "fixed"):
        copy = yaml.safe_load(json.loads(data[name]))
        assert {"webhook", "labels" if name == "defaults" else "sidecar"} <= set(copy)
        for section, keys in copy.items():
            for key, value in keys.items():
                assert value == injector[section][key], f"{name}: {section}.{key}"


@pytest.mark.parametrize("sets", [(), LABELS], ids=["defaults", "changed-labels"])
def test_the_webhook_and_the_policy_select_what_the_injector_injects(sets: tuple[str, ...]) -> None:
    objects = helm(*sets)
    config = parse_config(config_of(objects))
    (hook,) = objects[WEBHOOK]["webhooks"]
    policy = objects[SIDECAR_REQUIRED]["spec"]["matchConstraints"]
    keys = config.labels
    opted_in = {keys.namespace_opt_in: keys.namespace_opt_in_value}
    namespaces = ["serving", *sorted(config.excluded_namespaces)]
    identity = {keys.bento_repository: "llama3-service", keys.bento_version: "v1"}
    selected = {**identity, keys.model_store: keys.model_store_value}
    pods = [
        selected,
        {**selected, keys.inject: "false"},
        {**selected, keys.inject: "true"},
        {**identity, keys.model_store: "other"},
        identity,
    ]
    for namespace in namespaces:
        namespace_labels = {**opted_in, "kubernetes.io/metadata.name": namespace}
        # A namespace without the opt-in label is never sent either.
        assert not selects(hook["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
        for labels in pods:
            pod = bento_pod()
            pod["metadata"]["labels"] = labels
            sent = selects(hook["namespaceSelector"], namespace_labels) and selects(
                hook["objectSelector"], labels
            )
            injected = run(pod, config, namespace).outcome == "injected"
            assert sent == injected, (namespace, labels)
            if namespace not in config.excluded_namespaces:
                # The policy holds exactly those pods to having the sidecar.
                held = selects(policy["namespaceSelector"], namespace_labels) and selects(
                    policy["objectSelector"], labels
                )
                assert held == sent, (namespace, labels)
    if sets:
        assert keys.model_store == "example.com/store"
        assert config.excluded_namespaces == {"kube-system", "platform", NAMESPACE}


def test_the_port_follows_the_config() -> None:
    objects = helm("config.server.port=8443")
    assert parse_config(config_of(objects)).server.port == 8443
    (container,) = pod_spec(objects, DEPLOYMENT)["containers"]
    assert container["ports"] == [{"name": "https", "containerPort": 8443}]
    (rule,) = objects[NETWORK_POLICY]["spec"]["ingress"]
    assert rule["ports"] == [{"port": 8443, "protocol": "TCP"}]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("config.webhook.timeoutSeconds=10", "config.webhook.timeoutSeconds was removed: set"),
        ("config.server.reviewQueueSeconds=5", "must be less than webhook.timeoutSeconds (5)"),
        ("webhook.timeoutSeconds=1", "config.server.reviewQueueSeconds (1) must be less"),
        ("config.labels.model_store=x", "config.labels.model_store: write it modelStore"),
        ("config.webhook.namespace=other", 'config.webhook.namespace is "other"'),
        ("config.sidecar.containerName=x", 'config.sidecar.containerName is "x"'),
        ("config.readiness.condition_type=x", 'config.readiness.condition_type is "x"'),
        ("webhook.failurePolicy=Maybe", "value must be one of 'Ignore', 'Fail'"),
        ("webhook.timeoutSeconds=31", "webhook/timeoutSeconds"),
        ("config.server.port=0", "config/server/port"),
    ],
)
def test_the_chart_refuses_settings_its_objects_cannot_follow(value: str, message: str) -> None:
    args = [str(tool_binaries()["helm"]), "template", "x", str(CHART), "--set", value]
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_repeating_a_fixed_name_in_the_config_is_allowed() -> None:
    objects = helm("config.webhook.namespace=bento-juicefs-system")
    assert parse_config(config_of(objects)).webhook.namespace == NAMESPACE


def checksums(objects: dict[Key, dict[str, Any]]) -> tuple[str, str]:
    """The checksum/config annotation of the injector's and the node agent's pods."""
    return (
        objects[DEPLOYMENT]["spec"]["template"]["metadata"]["annotations"][CHECKSUM],
        objects[DAEMON_SET]["spec"]["template"]["metadata"]["annotations"][CHECKSUM],
    )


def test_a_changed_config_rolls_the_injector_and_the_agents() -> None:
    objects = helm()
    text = objects[CONFIG_MAP]["data"]["config.yaml"]
    # The hash of the config.yaml the pods read (the block scalar adds the last newline).
    digest = hashlib.sha256(text.removesuffix("\n").encode()).hexdigest()
    assert checksums(objects) == (digest, digest)
    for changed in ("config.juicefs.bufferSizeMib=512", "image.tag=1.2.3", "profile=eks"):
        assert set(checksums(helm(changed))).isdisjoint(checksums(objects)), changed
    # What is not in the config does not roll them.
    assert checksums(helm("injector.replicas=3", "nodeAgent.retrySeconds=30")) == checksums(objects)
    # The comparison with the overlays ignores exactly this annotation.
    annotated = normalise(objects[DEPLOYMENT])
    annotated["spec"]["template"]["metadata"]["annotations"] = {"other": "x"}
    assert normalise(annotated) != normalise(objects[DEPLOYMENT])


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_the_pdb_follows_the_replica_count(replicas: int) -> None:
    objects = helm(f"injector.replicas={replicas}")
    assert objects[DEPLOYMENT]["spec"]["replicas"] == replicas
    pdb = objects.get(("PodDisruptionBudget", "bento-juicefs-injector", NAMESPACE))
    if replicas == 1:
        # minAvailable 1 of 1 would block every drain of the replica's node.
        assert pdb is None
        return
    assert pdb is not None
    assert pdb["spec"] == {
        "minAvailable": 1,
        "selector": objects[DEPLOYMENT]["spec"]["selector"],
    }


# Non-default values for every setting that appears in more than one object.
AGREE = {
    "defaults": (),
    "changed": (
        *LABELS,
        "config.server.port=8443",
        "config.server.reviewQueueSeconds=4",
        "webhook.timeoutSeconds=10",
        "image.repository=registry.example.com/bj",
        "image.tag=2.0.0",
        "imagePullSecrets[0].name=regcred",
        # The node's port then: the webhook's copies of it follow all the same.
        "injector.hostNetwork=true",
        "metrics.serviceMonitor.enabled=true",
        "metrics.sidecarPodMonitor.enabled=true",
    ),
    "cert-manager": (
        "certificates.mode=certManager",
        "config.server.port=10250",
        "image.digest=sha256:" + "ab" * 32,
        "metrics.serviceMonitor.enabled=true",
    ),
}


def named_port(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    assert isinstance(port, int)
    return port


@pytest.mark.parametrize("sets", list(AGREE.values()), ids=list(AGREE))
def test_every_setting_in_two_places_agrees(sets: tuple[str, ...]) -> None:
    """The config the injector parses from the ConfigMap against every object that repeats
    one of its settings: one source, whatever the values."""
    objects = helm(*sets)
    config = parse_config(config_of(objects))
    keys = config.labels
    injector = pod_spec(objects, DEPLOYMENT)
    (container,) = injector["containers"]
    agent = pod_spec(objects, DAEMON_SET)["containers"][0]
    service = objects[("Service", config.webhook.service_name, config.webhook.namespace)]
    webhook_configuration = objects[
        ("MutatingWebhookConfiguration", config.webhook.configuration_name, "")
    ]
    (hook,) = webhook_configuration["webhooks"]

    # The port: the container's https port is the config's; the Service, the
    # probes and the ServiceMonitor name it, the NetworkPolicy opens that number.
    assert named_port(container, "https") == config.server.port
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "https"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "https"
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
    (rule,) = objects[NETWORK_POLICY]["spec"]["ingress"]
    assert rule["ports"] == [{"port": config.server.port, "protocol": "TCP"}]
    pod_labels = objects[DEPLOYMENT]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        objects[NETWORK_POLICY]["spec"]["podSelector"],
        {"matchLabels": service["spec"]["selector"]},
    ):
        assert selects(selector, pod_labels)

    # The webhook calls that Service, under the names the injector uses for
    # its certificate and its caBundle.
    assert hook["name"] == config.webhook.name
    assert hook["clientConfig"]["service"] == {
        "name": config.webhook.service_name,
        "namespace": config.webhook.namespace,
        "path": "/mutate",
        "port": service_port["port"],
    }
    assert hook["timeoutSeconds"] > config.server.review_queue_seconds
    assert objects[DEPLOYMENT]["metadata"]["namespace"] == config.webhook.namespace

    # Its selectors, and the sidecar-required policy's, are the config's labels.
    assert hook["namespaceSelector"]["matchExpressions"][0] == {
        "key": keys.namespace_opt_in,
        "operator": "In",
        "values": [keys.namespace_opt_in_value],
    }
    (excluded,) = hook["namespaceSelector"]["matchExpressions"][1:]
    assert (excluded["key"], excluded["operator"]) == ("kubernetes.io/metadata.name", "NotIn")
    assert set(excluded["values"]) == config.excluded_namespaces
    assert hook["objectSelector"] == {
        "matchExpressions": [
            {"key": keys.model_store, "operator": "In", "values": [keys.model_store_value]},
            {"key": keys.inject, "operator": "NotIn", "values": ["false"]},
        ]
    }
    policy = objects[SIDECAR_REQUIRED]["spec"]
    assert policy["matchConstraints"]["objectSelector"] == hook["objectSelector"]
    assert policy["matchConstraints"]["namespaceSelector"] == {
        "matchLabels": {keys.namespace_opt_in: keys.namespace_opt_in_value}
    }
    variables = {v["name"]: v["expression"] for v in policy["variables"]}
    assert variables["sidecar"] == repr(config.sidecar.container_name)
    assert variables["cacheVolume"] == repr(config.volumes.cache_name)
    assert variables["agentVolume"] == repr(config.volumes.agent_name)
    assert f"{keys.model_store}={keys.model_store_value}" in policy["validations"][0]["message"]

    # One image: the injector's, the agent's, the sidecar's; and the Secrets
    # to pull it with (the sidecar's in the pods the injector injects).
    assert container["image"] == agent["image"] == config.sidecar.image
    for spec in (injector, pod_spec(objects, DAEMON_SET)):
        pulls = tuple(s["name"] for s in spec.get("imagePullSecrets", []))
        assert pulls == config.sidecar.image_pull_secrets
    injected = injected_pod(config)["spec"].get("imagePullSecrets", [])
    assert tuple(s["name"] for s in injected) == config.sidecar.image_pull_secrets

    # Both read this ConfigMap, and roll when it changes.
    for spec in (injector, pod_spec(objects, DAEMON_SET)):
        (volume,) = [v for v in spec["volumes"] if v["name"] == "config"]
        assert volume["configMap"]["name"] == CONFIG_MAP[1]
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "config"]
        args = spec["containers"][0]["args"]
        assert args[args.index("--config") + 1] == f"{mount['mountPath']}/config.yaml"
    assert checksums(objects)[0] == checksums(objects)[1]

    # The RBAC names the webhook configuration and the CA Secret the injector keeps.
    role = objects[("Role", "bento-juicefs-injector", config.webhook.namespace)]
    named = {name for rule in role["rules"] for name in rule.get("resourceNames", [])}
    assert config.webhook.ca_secret_name in named
    cluster_role = objects[("ClusterRole", "bento-juicefs-injector", "")]
    webhook_rules = [
        r for r in cluster_role["rules"] if "mutatingwebhookconfigurations" in r["resources"]
    ]
    if config.webhook.manage_ca_bundle:
        (webhook_rule,) = webhook_rules
        assert webhook_rule["resourceNames"] == [config.webhook.configuration_name]
    else:
        assert not webhook_rules

    # The monitors, where enabled: the Service's port by name, the certificate's
    # name, the sidecar's container and metrics port.
    monitor = objects.get(("ServiceMonitor", "bento-juicefs-injector", NAMESPACE))
    if monitor is not None:
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] == service_port["name"]
        assert endpoint["tlsConfig"]["serverName"] == (
            f"{config.webhook.service_name}.{config.webhook.namespace}.svc"
        )
        if config.webhook.manage_ca_bundle:
            assert endpoint["tlsConfig"]["ca"]["secret"]["name"] == config.webhook.ca_secret_name
    sidecar_monitor = objects.get(("PodMonitor", "bento-juicefs-sidecars", NAMESPACE))
    if sidecar_monitor is not None:
        assert sidecar_monitor["spec"]["selector"] == {
            "matchLabels": {keys.model_store: keys.model_store_value}
        }
        (endpoint,) = sidecar_monitor["spec"]["podMetricsEndpoints"]
        (keep,) = [r for r in endpoint["relabelings"] if r.get("action") == "keep"]
        assert keep["regex"] == config.sidecar.container_name
        sidecar = injected_sidecar(config)
        assert named_port(sidecar, endpoint["port"]) == config.sidecar.metrics_port

    # What the install's notes tell the user to run.
    text = notes("default", *sets)
    assert (
        f"kubectl label namespace <ns> {keys.namespace_opt_in}={keys.namespace_opt_in_value}"
        in text
    )
    first_secret = config.juicefs.secret_name_template.replace(
        "{volume}", config.juicefs.allowed_volumes[0]
    )
    assert f"create secret generic {first_secret} " in text

    if sets == AGREE["changed"]:
        # The values did change what they should: no assertion above held by default alone.
        assert (config.server.port, keys.model_store) == (8443, "example.com/store")
        assert config.sidecar.image == "registry.example.com/bj:2.0.0"
        assert config.sidecar.image_pull_secrets == ("regcred",)
        assert hook["timeoutSeconds"] == 10


def kubelet_root(spec: dict[str, Any]) -> tuple[str, str, str]:
    """The kubelet-root hostPath, its mountPath and the agent's --kubelet-root."""
    (volume,) = [v for v in spec["volumes"] if v["name"] == "kubelet-root"]
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "kubelet-root"]
    args = spec["containers"][0]["args"]
    assert volume["hostPath"]["type"] == "Directory"
    assert mount["mountPropagation"] == "Bidirectional"
    return volume["hostPath"]["path"], mount["mountPath"], args[args.index("--kubelet-root") + 1]


def test_the_kubelet_root_value_sets_the_host_path_the_mount_and_the_flag() -> None:
    for profile in PROFILES:
        assert (
            kubelet_root(pod_spec(helm(*_sets(profile)), DAEMON_SET)) == ("/var/lib/kubelet",) * 3
        )
    objects = helm("nodeAgent.kubeletRoot=/var/data/kubelet")
    assert kubelet_root(pod_spec(objects, DAEMON_SET)) == ("/var/data/kubelet",) * 3


def test_the_agent_tolerates_the_startup_taint_whatever_its_tolerations_value() -> None:
    startup = {"key": STARTUP_TAINT, "operator": "Exists", "effect": "NoSchedule"}
    shipped = pod_spec(helm(), DAEMON_SET)["tolerations"]
    assert shipped[0] == startup
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in shipped
    assert pod_spec(helm("nodeAgent.tolerations=null"), DAEMON_SET)["tolerations"] == [startup]


def helm_in(release_namespace: str, *command: str) -> str:
    """helm with the release in release_namespace, reaching no cluster."""
    args = [str(tool_binaries()["helm"]), *command, "-n", release_namespace]
    env = {**os.environ, "KUBECONFIG": "/nonexistent/kubeconfig"}
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def notes(release_namespace: str, *sets: str) -> str:
    """NOTES.txt as `helm install` prints it (a client-side dry run)."""
    command = ["install", "bento-juicefs", str(CHART), "--dry-run=client"]
    for item in sets:
        command += ["--set", item]
    out = helm_in(release_namespace, *command)
    return out[out.index("NOTES:") :]


def test_namespace_values() -> None:
    namespace = ("Namespace", NAMESPACE, "")
    assert "annotations" not in helm()[namespace]["metadata"]
    labels = helm()[namespace]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    kept = helm("namespace.keep=true")[namespace]
    assert kept["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    objects = helm("namespace.create=false")
    assert namespace not in objects
    assert sorted(objects) == sorted(key for key in helm() if key != namespace)


def test_a_release_in_the_namespace_does_not_create_it() -> None:
    """`helm install -n bento-juicefs-system [--create-namespace]`: Helm needs the namespace
    before the chart's objects (it keeps the release there), so the chart's Namespace would
    collide with it; the rest is the same, and the notes say how to label it."""
    namespace = ("Namespace", NAMESPACE, "")
    default = helm()
    inside = parse_objects(helm_in(NAMESPACE, "template", "bento-juicefs", str(CHART)))
    assert namespace not in inside
    assert inside == {key: obj for key, obj in default.items() if key != namespace}
    for text in (notes(NAMESPACE), notes("default", "namespace.create=false")):
        assert "kubectl label namespace bento-juicefs-system" in text
        assert "pod-security.kubernetes.io/enforce=privileged" in text
    assert "kubectl label namespace bento-juicefs-system" not in notes("default")


def test_node_agent_disabled() -> None:
    objects = helm("nodeAgent.enabled=false")
    assert not [key for key in objects if "node-agent" in key[1] and "fence" not in key[1]]
    assert ("Deployment", "bento-juicefs-injector", NAMESPACE) in objects


# --- certificates ---------------------------------------------------------------


def injector_resources(objects: dict[Key, dict[str, Any]]) -> set[str]:
    """Every resource the injector's ClusterRole names."""
    role = objects[("ClusterRole", "bento-juicefs-injector", "")]
    return {resource for rule in role["rules"] for resource in rule["resources"]}


def test_self_signed_by_default() -> None:
    objects = helm()
    assert not [key for key in objects if key[0] in {"Certificate", "Issuer"}]
    webhook = objects[("MutatingWebhookConfiguration", "bento-juicefs-injector", "")]
    assert "annotations" not in webhook["metadata"]
    config = parse_config(config_of(objects))
    assert config.server.self_signed
    assert config.webhook.manage_ca_bundle
    assert "mutatingwebhookconfigurations" in injector_resources(objects)


def test_cert_manager() -> None:
    objects = helm("certificates.mode=certManager")
    issuer = objects[("Issuer", "bento-juicefs-injector-selfsigned", NAMESPACE)]
    assert issuer["spec"] == {"selfSigned": {}}
    cert = objects[("Certificate", "bento-juicefs-injector-serving", NAMESPACE)]
    assert "bento-juicefs-injector.bento-juicefs-system.svc" in cert["spec"]["dnsNames"]
    assert cert["spec"]["issuerRef"]["name"] == "bento-juicefs-injector-selfsigned"
    webhook = objects[("MutatingWebhookConfiguration", "bento-juicefs-injector", "")]
    assert webhook["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": f"{NAMESPACE}/bento-juicefs-injector-serving"
    }
    # The injector serves cert-manager's files and leaves the caBundle alone.
    config = parse_config(config_of(objects))
    assert not config.server.self_signed
    assert not config.webhook.manage_ca_bundle
    spec = pod_spec(objects, ("Deployment", "bento-juicefs-injector", NAMESPACE))
    (volume,) = [v for v in spec["volumes"] if v["name"] == "certs"]
    assert volume == {"name": "certs", "secret": {"secretName": cert["spec"]["secretName"]}}
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "certs"]
    assert mount["mountPath"] == config.server.cert_dir
    assert mount["readOnly"] is True
    # cainjector keeps the caBundle: the injector may not touch its webhook at all.
    assert "mutatingwebhookconfigurations" not in injector_resources(objects)


def test_cert_manager_with_an_issuer() -> None:
    objects = helm(
        "certificates.mode=certManager",
        "certificates.certManager.issuerRef.name=corp-ca",
        "certificates.certManager.issuerRef.kind=ClusterIssuer",
    )
    assert not [key for key in objects if key[0] == "Issuer"]
    cert = objects[("Certificate", "bento-juicefs-injector-serving", NAMESPACE)]
    assert cert["spec"]["issuerRef"] == {
        "name": "corp-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }


# --- monitoring -------------------------------------------------------------------


def test_monitors_are_off_by_default() -> None:
    objects = helm()
    assert not [key for key in objects if key[0] in {"ServiceMonitor", "PodMonitor"}]
    assert DASHBOARD_CONFIG_MAP not in objects


@pytest.mark.parametrize("mode", ["selfSigned", "certManager"])
def test_monitors(mode: str) -> None:
    objects = helm(
        "metrics.serviceMonitor.enabled=true",
        "metrics.podMonitor.enabled=true",
        "metrics.serviceMonitor.labels.release=prom",
        f"certificates.mode={mode}",
    )
    monitor = objects[("ServiceMonitor", "bento-juicefs-injector", NAMESPACE)]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    (endpoint,) = monitor["spec"]["endpoints"]
    service = objects[("Service", "bento-juicefs-injector", NAMESPACE)]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert (endpoint["scheme"], endpoint["path"]) == ("https", "/metrics")
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    secret = endpoint["tlsConfig"]["ca"]["secret"]
    config = parse_config(config_of(objects))
    expected = (
        config.webhook.ca_secret_name
        if mode == "selfSigned"
        else objects[("Certificate", "bento-juicefs-injector-serving", NAMESPACE)]["spec"][
            "secretName"
        ]
    )
    assert secret == {"name": expected, "key": "ca.crt"}

    pod_monitor = objects[("PodMonitor", "bento-juicefs-node-agent", NAMESPACE)]
    (pod_endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    ports = pod_spec(objects, DAEMON_SET)["containers"][0]["ports"]
    assert {"name": pod_endpoint["port"], "containerPort": 9464} in ports
    labels = objects[DAEMON_SET]["spec"]["selector"]["matchLabels"]
    assert pod_monitor["spec"]["selector"]["matchLabels"] == labels


def test_the_sidecars_pod_monitor_finds_the_port_the_injector_declares() -> None:
    objects = helm(
        "metrics.sidecarPodMonitor.enabled=true",
        "metrics.sidecarPodMonitor.interval=15s",
        "metrics.sidecarPodMonitor.labels.release=prom",
    )
    monitor = objects[("PodMonitor", "bento-juicefs-sidecars", NAMESPACE)]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    config = parse_config(config_of(objects))
    # Every JuiceFS Bento pod, in whichever tenant namespace it runs.
    assert monitor["spec"]["selector"] == {
        "matchLabels": {config.labels.model_store: config.labels.model_store_value}
    }
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["scheme"], endpoint["path"], endpoint["interval"]) == (
        "http",
        "/metrics",
        "15s",
    )
    keep = [r for r in endpoint["relabelings"] if r.get("action") == "keep"]
    assert keep == [
        {
            "sourceLabels": ["__meta_kubernetes_pod_container_name"],
            "regex": config.sidecar.container_name,
            "action": "keep",
        }
    ]
    sidecar = next(
        c for c in inject(bento_pod(), config)["spec"]["initContainers"]
        if c["name"] == config.sidecar.container_name
    )  # fmt: skip
    assert {"name": endpoint["port"], "containerPort": config.sidecar.metrics_port} in [
        {"name": p["name"], "containerPort": p["containerPort"]} for p in sidecar["ports"]
    ]
    # Only the sidecars': the node agents' stays behind its own value.
    assert ("PodMonitor", "bento-juicefs-node-agent", NAMESPACE) not in objects


def test_the_grafana_dashboard_config_map() -> None:
    objects = helm("metrics.grafanaDashboard.enabled=true")
    config_map = objects[DASHBOARD_CONFIG_MAP]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (name,) = config_map["data"]
    dashboard = CHART / "dashboards" / "bento-juicefs.json"
    assert json.loads(config_map["data"][name]) == json.loads(dashboard.read_text())
    moved = helm(
        "metrics.grafanaDashboard.enabled=true",
        "metrics.grafanaDashboard.namespace=monitoring",
        "metrics.grafanaDashboard.labels.grafana_folder=bento",
    )
    config_map = moved[("ConfigMap", "bento-juicefs-dashboard", "monitoring")]
    assert config_map["metadata"]["labels"]["grafana_folder"] == "bento"


def test_the_comparison_sees_a_changed_value() -> None:
    chart, overlay = helm("injector.replicas=3"), kustomize("gke")
    key = ("Deployment", "bento-juicefs-injector", NAMESPACE)
    assert dump(normalise(chart[key])) != dump(normalise(overlay[key]))
    chart = helm("config.cluster.kubernetesVersion=1.31")
    assert dump(normalise(chart[CONFIG_MAP])) != dump(normalise(overlay[CONFIG_MAP]))


def test_the_webhook_port_admits_the_sources_named_and_any_by_default() -> None:
    key = ("NetworkPolicy", "bento-juicefs-injector", NAMESPACE)
    (open_port,) = helm()[key]["spec"]["ingress"]
    assert open_port == {"ports": [{"port": 9443, "protocol": "TCP"}]}
    (fenced,) = helm(
        "injector.networkPolicyFrom[0].ipBlock.cidr=172.16.0.0/28",
        "injector.networkPolicyFrom[1].namespaceSelector.matchLabels"
        ".kubernetes\\.io/metadata\\.name=monitoring",
    )[key]["spec"]["ingress"]
    assert fenced["ports"] == [{"port": 9443, "protocol": "TCP"}]
    assert fenced["from"] == [
        {"ipBlock": {"cidr": "172.16.0.0/28"}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
    ]


# --- helm test: the check, in the cluster ----------------------------------------

CHECK = "bento-juicefs-check"
CHECK_POD = ("Pod", CHECK, NAMESPACE)
CHECK_IDENTITY = (
    ("ServiceAccount", CHECK, NAMESPACE),
    ("ClusterRole", CHECK, ""),
    ("ClusterRoleBinding", CHECK, ""),
)
CHECK_OBJECTS = (*CHECK_IDENTITY, CHECK_POD)


def hooks(objects: dict[Key, dict[str, Any]]) -> dict[Key, dict[str, str]]:
    """The Helm hooks rendered: their annotations."""
    return {
        key: obj["metadata"]["annotations"]
        for key, obj in objects.items()
        if HOOK in (obj["metadata"].get("annotations") or {})
    }


def test_the_checks_objects_are_test_hooks_the_identity_first_and_gone_after() -> None:
    found = hooks(helm())
    assert sorted(found) == sorted(CHECK_OBJECTS)
    for key in CHECK_IDENTITY:
        assert found[key] == {
            HOOK: "test",
            "helm.sh/hook-weight": "-1",
            "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded",
        }, key
    # After the identity; kept once it ran (its log), replaced by the next test,
    # and its log printed by `helm test` itself, passed or failed.
    assert found[CHECK_POD] == {
        HOOK: "test",
        "helm.sh/hook-weight": "0",
        "helm.sh/hook-delete-policy": "before-hook-creation",
        "helm.sh/hook-output-log-policy": "hook-succeeded,hook-failed",
    }
    assert int(found[CHECK_POD]["helm.sh/hook-weight"]) > max(
        int(found[key]["helm.sh/hook-weight"]) for key in CHECK_IDENTITY
    )
    binding = helm()[("ClusterRoleBinding", CHECK, "")]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": CHECK,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": CHECK, "namespace": NAMESPACE}
    ]


def test_tests_check_enabled_false_renders_none_of_them() -> None:
    objects = helm("tests.check.enabled=false")
    assert hooks(objects) == {}
    assert objects == without_hooks(helm())
    assert "helm test" not in notes("default", "tests.check.enabled=false")
    assert "helm test bento-juicefs -n default" in notes("default")


@pytest.mark.parametrize(
    "sets",
    [
        (),
        (
            "image.digest=sha256:" + "ab" * 32,
            "image.pullPolicy=Always",
            "imagePullSecrets[0].name=regcred",
        ),
        (
            "image.tag=0.2.0",
            "injector.nodeSelector.pool=system",
            "injector.tolerations[0].key=dedicated",
        ),
    ],
)
def test_the_check_pod_runs_the_check_in_the_injectors_image(sets: tuple[str, ...]) -> None:
    objects = helm(*sets)
    pod = objects[CHECK_POD]
    injector = pod_spec(objects, DEPLOYMENT)
    spec = pod["spec"]
    (container,) = spec["containers"]
    (serving,) = injector["containers"]
    config = parse_config(config_of(objects))
    assert container["command"] == [
        "python",
        "-m",
        "injector",
        "check",
        "-n",
        config.webhook.namespace,
    ]
    assert "args" not in container
    assert config.webhook.namespace == NAMESPACE == pod["metadata"]["namespace"]
    for field in ("image", "imagePullPolicy"):
        assert container.get(field) == serving.get(field), field
    for field in ("imagePullSecrets", "nodeSelector", "tolerations"):
        assert spec.get(field) == injector.get(field), field
    assert spec["serviceAccountName"] == CHECK
    assert spec["automountServiceAccountToken"] is True
    assert spec["restartPolicy"] == "Never"
    assert "hostNetwork" not in spec
    assert "volumes" not in spec
    # Pod Security restricted, with the injector's own contexts.
    assert restricted_violations(pod, container) == []
    assert spec["securityContext"] == injector["securityContext"]
    assert container["securityContext"] == serving["securityContext"]
    assert container["resources"] == {
        "requests": {"cpu": "50m", "memory": "128Mi"},
        "limits": {"memory": "256Mi"},
    }


def test_the_check_runs_in_the_injectors_namespace_whatever_the_releases() -> None:
    objects = parse_objects(helm_in("tenant-tools", "template", "bento-juicefs", str(CHART)))
    pod = objects[CHECK_POD]
    assert pod["spec"]["containers"][0]["command"][-2:] == ["-n", NAMESPACE]
    assert objects[("ClusterRoleBinding", CHECK, "")]["subjects"][0]["namespace"] == NAMESPACE


def request_atom(path: str) -> Atom | None:
    """The RBAC (group, resource, verb, name) a GET of path needs; None for a non-resource URL."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    elif parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        return None
    if rest[0] == "namespaces" and len(rest) > 2:
        rest = rest[2:]
    name = rest[1] if len(rest) > 1 else None
    return Atom(group, rest[0], "get" if name else "list", name or "*")


def object_path(obj: dict[str, Any]) -> str:
    group_version = obj["apiVersion"]
    root = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    namespace = obj["metadata"].get("namespace")
    where = f"/namespaces/{namespace}" if namespace else ""
    return f"{root}{where}/{obj['kind'].lower()}s/{obj['metadata']['name']}"


class RecordingApi:
    """call_api for GETs: the objects given by path, an empty list for any collection, 404
    for the rest; every path asked for."""

    def __init__(self, objects: dict[str, Any]) -> None:
        self.objects = objects
        self.paths: list[str] = []
        self.configuration = type("Configuration", (), {"host": "https://203.0.113.7:6443"})()

    async def call_api(self, path: str, method: str, **kwargs: Any) -> Any:
        from injector.kube import ApiException

        assert method == "GET"
        self.paths.append(path)
        if path in self.objects:
            return json.loads(json.dumps(self.objects[path]))
        atom = request_atom(path)
        if atom is not None and atom.verb == "list":
            return {"items": []}
        raise ApiException(status=404, reason="Not Found")

    async def close(self) -> None:
        pass


def granted_atoms(role: dict[str, Any]) -> set[Atom]:
    return {
        Atom(group, resource, verb, name)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames") or ["*"]
    }


@pytest.mark.parametrize(
    "sets",
    [
        (),
        (
            "config.juicefs.allowedVolumes={models,llama}",
            "config.juicefs.secretNameTemplate=jfs-{volume}",
            "config.labels.namespaceOptIn=example.com/bento-models",
        ),
        ("certificates.mode=certManager", "nodeAgent.enabled=false"),
    ],
)
async def test_the_checks_role_is_what_the_check_reads_get_and_list_only(
    sets: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check run as the pod runs it, on the objects the chart renders, with an opted-in
    namespace: each GET it makes is granted, and the role grants nothing it does not make."""
    import injector.check.fetch

    objects = helm(*sets)
    config = parse_config(config_of(objects))
    keys = config.labels
    served = {object_path(obj): obj for obj in without_hooks(objects).values()}
    served["/version"] = {"major": "1", "minor": "37", "gitVersion": "v1.37.2"}
    served["/api/v1/namespaces"] = {
        "items": [
            {"metadata": {"name": NAMESPACE}},
            {
                "metadata": {
                    "name": "tenant",
                    "labels": {keys.namespace_opt_in: keys.namespace_opt_in_value},
                }
            },
        ]
    }
    api = RecordingApi(served)

    async def new_api_client(kubeconfig: str | None, context: str | None = None) -> RecordingApi:
        assert (kubeconfig, context) == (None, None)  # in the pod: its own token
        return api

    monkeypatch.setattr(injector.check.fetch, "new_api_client", new_api_client)
    command = objects[CHECK_POD]["spec"]["containers"][0]["command"]
    namespace = command[command.index("-n") + 1]
    checked = await injector.check.fetch.check_cluster(None, None, namespace=namespace)
    assert checked.config.source == f"configmap {NAMESPACE}/{CONFIG_MAP[1]}"
    asked = {atom for atom in map(request_atom, api.paths) if atom is not None}
    assert [path for path in api.paths if request_atom(path) is None] == ["/version"]
    # It read a copy of each credentials Secret in the opted-in namespace, and their pods.
    for name in credential_secret_names(config):
        assert f"/api/v1/namespaces/tenant/secrets/{name}" in api.paths
    assert "/api/v1/namespaces/tenant/pods" in api.paths
    role = objects[("ClusterRole", CHECK, "")]
    assert granted_atoms(role) == asked
    assert {verb for rule in role["rules"] for verb in rule["verbs"]} == {"get", "list"}
    assert all("nonResourceURLs" not in rule for rule in role["rules"])


def test_the_checks_rbac_is_its_table() -> None:
    role = helm()[("ClusterRole", CHECK, "")]
    rows = documented("security.md", "### The `helm test` check")
    assert {row.scope for row in rows} == {"cluster"}
    assert granted_atoms(role) == {atom for row in rows for atom in row.atoms}
