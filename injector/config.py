"""The injector's configuration: one YAML file parsed into pydantic models.

Every label, annotation, image, path, size, profile and selector named in
DESIGN.md is a key here; the defaults are the GKE profile. Keys are camelCase
in YAML, like the Kubernetes objects they describe.

One module of ~550 lines on purpose: the schema is one tree of models whose
validators check keys against each other (volumes against the cache,
profiles against the labels), read top to bottom beside
docs/configuration.md; split, every cross-check would import back up.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel, to_snake

from common import env
from common.env import SSD_POLICIES, CacheMode, SsdPolicy
from injector.quantity import parse_quantity

__all__ = ["SSD_POLICIES", "CacheMode", "ConfigError", "InjectorConfig", "SsdPolicy", "load_config"]

PREFIX = "juicefs.bentoml.com/"


def _check_quantity(value: str) -> str:
    parse_quantity(value)
    return value


Quantity = Annotated[str, AfterValidator(_check_quantity)]


def _check_node_path(value: str) -> str:
    if not value.startswith("/") or value == "/" or posixpath.normpath(value) != value:
        raise ValueError(
            "must be an absolute, normalized directory other than /, "
            "e.g. /mnt/stateful_partition/kube-ephemeral-ssd/bento-juicefs"
        )
    return value


# A directory on the node; the node cache of each JuiceFS volume is a subdirectory.
NodePath = Annotated[str, AfterValidator(_check_node_path)]

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SECRET_NAME = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")


def _check_secret_name(value: str) -> str:
    if len(value) > 253 or not _SECRET_NAME.fullmatch(value):
        raise ValueError("must be a Secret's name (a DNS subdomain: lowercase, digits, - and .)")
    return value


# A Secret's name, in the namespace of the pod that names it.
SecretName = Annotated[str, AfterValidator(_check_secret_name)]

_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)(?:\.\d+)?(?:[-+].*)?$")


def _check_k8s_version(value: str) -> str:
    if not _VERSION_RE.match(value):
        raise ValueError("must look like 1.30 or v1.30.2")
    return value


ALL_NAMESPACES = "*"
_NAMESPACE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def volume_open_to(namespaces: tuple[str, ...] | None, namespace: str) -> bool:
    """Whether a volume bound to namespaces (None: not bound, shared) is open to namespace."""
    return namespaces is None or ALL_NAMESPACES in namespaces or namespace in namespaces


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class Labels(_Model):
    """Label keys: the namespace opt-in, the pod selector and opt-out, Bento identity."""

    namespace_opt_in: str = PREFIX + "injection"
    namespace_opt_in_value: str = "enabled"
    model_store: str = PREFIX + "model-store"
    model_store_value: str = "juicefs"
    inject: str = PREFIX + "inject"
    bento_repository: str = "yatai.ai/bento-repository"
    bento_version: str = "yatai.ai/bento-version"


class Annotations(_Model):
    """Annotation keys: per-pod overrides and what the injector writes."""

    status: str = PREFIX + "status"
    models: str = PREFIX + "models"
    volume: str = PREFIX + "volume"
    cache_size: str = PREFIX + "cache-size"
    ssd_policy: str = PREFIX + "ssd-policy"
    sidecar_cpu: str = PREFIX + "sidecar-cpu"
    sidecar_memory: str = PREFIX + "sidecar-memory"
    sidecar_cpu_limit: str = PREFIX + "sidecar-cpu-limit"
    sidecar_memory_limit: str = PREFIX + "sidecar-memory-limit"
    warmup: str = PREFIX + "warmup"
    warmup_timeout: str = PREFIX + "warmup-timeout"
    cache_mode: str = PREFIX + "cache-mode"


def _check_metrics_port(value: int) -> int:
    try:
        return env.parse_metrics_port(str(value))
    except ValueError:
        raise ValueError(f"expected {env.METRICS_PORT_FORM}") from None


# The rule is the sidecar's (common.env), so the injector never writes a port it
# refuses. Strict: YAML's `true` is not port 1.
MetricsPort = Annotated[StrictInt, AfterValidator(_check_metrics_port)]


class Resources(_Model):
    cpu_request: Quantity = "250m"
    memory_request: Quantity = "512Mi"
    cpu_limit: Quantity | None = None
    memory_limit: Quantity | None = "2Gi"


class Sidecar(_Model):
    container_name: str = "juicefs-mount"
    image: str = "ghcr.io/bentoml/bento-juicefs-sidecar:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    # Secrets the kubelet may pull the sidecar's image with (a private
    # registry): added by name to the pod's imagePullSecrets, beside its own.
    # Each must exist in the pod's namespace; the injector does not copy them.
    image_pull_secrets: tuple[SecretName, ...] = ()
    command: tuple[str, ...] = ("python", "-m", "sidecar", "run")
    probe_command: tuple[str, ...] = ("python", "-m", "sidecar", "probe")
    resources: Resources = Resources()
    # How long the startup probe (native) or postStart hook (classic) waits
    # for the FUSE mount before the kubelet gives up and restarts the sidecar.
    mount_timeout_seconds: int = Field(default=300, ge=10, le=3600)
    # Containers a service mesh injects; they never get the model mount, and a
    # native mesh proxy is kept ahead of our sidecar so the mount's traffic
    # goes through the mesh from the start.
    mesh_proxy_containers: tuple[str, ...] = ("istio-proxy", "linkerd-proxy")
    mesh_init_containers: tuple[str, ...] = ("istio-init", "istio-validation", "linkerd-init")
    # The sidecar's own Prometheus /metrics, plain HTTP on the pod's IP, declared
    # as its container port `metrics` (what a PodMonitor selects). 0: none.
    metrics_port: MetricsPort = env.DEFAULT_METRICS_PORT


class Volumes(_Model):
    mount_dir_name: str = "juicefs-mount-dir"
    cache_name: str = "juicefs-cache"
    # The sidecar's own emptyDir, at common.env.AGENT_DIR: the node agent's
    # socket for the pod and its private FUSE mount. The node agent finds the
    # pods it serves by this volume.
    agent_name: str = "juicefs-agent"
    # Where the sidecar mounts JuiceFS (the shared mount dir) and keeps its cache.
    mount_path: str = "/var/lib/juicefs/mnt"
    cache_path: str = "/var/lib/juicefs/cache"
    # The pod cache's emptyDir medium: "" keeps it on the node's ephemeral
    # storage, which on local-SSD node pools is NVMe. "Memory" is tmpfs, for
    # tests and tiny models only. The node cache is always on the node's disk.
    cache_medium: Literal["", "Memory"] = ""


class Models(_Model):
    # BentoML reads a Bento's models from $BENTO_PATH/models.
    app_mount_path: str = "/home/bentoml/bento/models"
    # Path inside the JuiceFS volume; {name} and {version} are the Bento's.
    # The Bento's directory inside the JuiceFS volume ({name} and {version}
    # are the Bento's): models/ below it is what apps see, manifest.json
    # beside it lists the files to warm.
    juicefs_path_template: str = "/bentos/{name}/{version}"


class JuiceFS(_Model):
    default_volume: str = env.DEFAULT_VOLUME
    # Annotations may choose only among these volumes, so a pod can never
    # point itself at an arbitrary Secret.
    allowed_volumes: tuple[str, ...] = (env.DEFAULT_VOLUME,)
    # Which namespaces may use a volume, like a Vault role's bound namespaces:
    # volume -> namespace names ("*": every opted-in namespace). A volume
    # named here is given only to those namespaces (its credentials, and pods
    # that name it); one left out is shared by every opted-in namespace.
    # Administrators set it; no label or annotation a tenant writes widens it.
    volume_namespaces: dict[str, tuple[str, ...]] = {}
    # Per volume, the Secret in the pod's own namespace is named from this
    # template; the namespace controller creates it.
    secret_name_template: str = "juicefs-{volume}-credentials"
    meta_url_key: str = "metaurl"
    access_key_key: str = "access-key"
    secret_key_key: str = "secret-key"
    default_cache_size: Quantity = "20Gi"
    min_cache_size: Quantity = "1Gi"
    max_cache_size: Quantity = "2Ti"
    # JuiceFS's --cache-size is a soft limit; keep it under the emptyDir
    # sizeLimit so the kubelet never evicts the pod for a slightly full cache.
    cache_fill_ratio: float = Field(default=0.9, gt=0.1, le=1.0)
    # Defaults and bounds are the sidecar's contract (common.env).
    buffer_size_mib: int = Field(default=env.DEFAULT_BUFFER_SIZE_MIB, ge=env.MIN_BUFFER_SIZE_MIB)
    prefetch: int = Field(default=env.DEFAULT_PREFETCH, ge=0)


class Cache(_Model):
    """Where the JuiceFS block cache lives: the pod's emptyDir, or the node's local SSD."""

    # None: "node" when the platform profile (or nodePath) names a node cache
    # directory, else "pod". A pod may choose by annotation.
    mode: CacheMode | None = None
    # Overrides the profile's nodeCachePath; never settable by a pod.
    node_path: NodePath | None = None
    # What every pod's JuiceFS client on a node keeps the node's cache within.
    node_budget: Quantity = "200Gi"
    node_scan_seconds: int = Field(
        default=env.DEFAULT_CACHE_SCAN_SECONDS,
        ge=env.MIN_CACHE_SCAN_SECONDS,
        le=env.MAX_CACHE_SCAN_SECONDS,
    )
    # Node cache only: the node agent keeps each Bento it warms with every
    # model as a verified copy of its model files on the node's disk instead
    # of node cache blocks, and a sealed pod's app reads that copy (bound
    # read-only) instead of the FUSE mount.
    local_copy: bool = True


class Warmup(_Model):
    enabled: bool = env.DEFAULT_WARMUP
    timeout_seconds: int = Field(
        default=env.DEFAULT_WARMUP_TIMEOUT_SECONDS, ge=env.MIN_WARMUP_TIMEOUT_SECONDS
    )
    concurrency: int = Field(
        default=env.DEFAULT_WARMUP_CONCURRENCY,
        ge=env.MIN_WARMUP_CONCURRENCY,
        le=env.MAX_WARMUP_CONCURRENCY,
    )
    # A cache directory slower than this (MB/s, read or write) is reported:
    # a cache slower than the object store makes hits slower than misses.
    cache_min_mbps: float = Field(default=env.DEFAULT_CACHE_MIN_MBPS, ge=0)


class Readiness(_Model):
    condition_type: str = PREFIX + "models-ready"


class NodeLabel(_Model):
    """A node label to steer to; without a value the label only has to exist."""

    key: str
    value: str | None = "true"

    def expression(self) -> dict[str, Any]:
        if self.value is None:
            return {"key": self.key, "operator": "Exists"}
        return {"key": self.key, "operator": "In", "values": [self.value]}

    def __str__(self) -> str:
        return self.key if self.value is None else f"{self.key}={self.value}"


class Scheduling(_Model):
    ssd_policy: SsdPolicy = env.DEFAULT_SSD_POLICY
    # Overrides the platform profile's local-SSD node label.
    ssd_node_label: NodeLabel | None = None
    preferred_weight: int = Field(default=100, ge=1, le=100)
    # A pod on the node cache prefers nodes whose node agent labels its Bento
    # warm (common.warm): it reads the model from local disk there.
    prefer_warm_nodes: bool = True
    # The scheduler adds up the weights of the preferred terms a node matches,
    # so only their ratios count. 75 puts a warm node ahead of an
    # image-streaming one (the profiles' streamingWeight, 50): the model is most
    # of a Bento's cold-start bytes, streaming saves only part of the image
    # pull. It stays below the SSD term (preferredWeight, 100, with ssdPolicy
    # preferred): the SSD serves every read and every Bento, warmth one Bento
    # until it is evicted.
    warm_node_weight: int = Field(default=75, ge=1, le=100)


class PlatformProfile(_Model):
    """One platform: which nodes have local NVMe, which stream images, which images can."""

    ssd_node_label: NodeLabel | None = None
    # The directory on the node's local SSD that holds the node cache (one
    # subdirectory per JuiceFS volume); None: this platform has no node cache.
    node_cache_path: NodePath | None = None
    streaming_node_label: NodeLabel | None = None
    streaming_affinity: Literal["required", "preferred", "off"] = "preferred"
    streaming_weight: int = Field(default=50, ge=1, le=100)
    # fnmatch patterns against the fully-qualified image reference.
    streamable_images: tuple[str, ...] = ()
    description: str = ""


def _default_profiles() -> dict[str, PlatformProfile]:
    return {
        "gke": PlatformProfile(
            ssd_node_label=NodeLabel(key="cloud.google.com/gke-ephemeral-storage-local-ssd"),
            # Where GKE mounts the local SSDs of --ephemeral-storage-local-ssd
            # (RAID 0; the kubelet's and containerd's directories live there too).
            node_cache_path="/mnt/stateful_partition/kube-ephemeral-ssd/bento-juicefs",
            streaming_node_label=NodeLabel(key="cloud.google.com/gke-image-streaming"),
            streamable_images=("*-docker.pkg.dev/*", "gcr.io/*", "*.gcr.io/*", "docker.io/*"),
            description="GKE Image streaming",
        ),
        "eks": PlatformProfile(
            # Karpenter labels instance types that have local NVMe with its size.
            ssd_node_label=NodeLabel(key="karpenter.k8s.aws/instance-local-nvme", value=None),
            # Where the EKS AMIs mount instance-store NVMe (Karpenter
            # instanceStorePolicy: RAID0, nodeadm localStorage, Bottlerocket).
            node_cache_path="/mnt/k8s-disks/0/bento-juicefs",
            streaming_affinity="off",
            streamable_images=("*.dkr.ecr.*.amazonaws.com/*",),
            description="EKS SOCI lazy loading",
        ),
        "aks": PlatformProfile(
            # AKS has no standard label for local NVMe: set scheduling.ssdNodeLabel.
            # Azure mounts the VM's local temporary disk at /mnt.
            node_cache_path="/mnt/bento-juicefs",
            streaming_node_label=NodeLabel(key="kubernetes.azure.com/artifactstreaming-enabled"),
            streamable_images=("*.azurecr.io/*",),
            description="AKS Artifact Streaming",
        ),
        "none": PlatformProfile(streaming_affinity="off", description="no image streaming"),
    }


class Cluster(_Model):
    # Native sidecars (initContainers with restartPolicy: Always) need 1.29+.
    kubernetes_version: Annotated[str, AfterValidator(_check_k8s_version)] = "1.30"
    platform_profile: str = "gke"
    profiles: dict[str, PlatformProfile] = Field(default_factory=_default_profiles)

    @model_validator(mode="after")
    def _profile_exists(self) -> Cluster:
        if self.platform_profile not in self.profiles:
            known = ", ".join(sorted(self.profiles))
            raise ValueError(
                f"platformProfile {self.platform_profile!r} is not one of the profiles: {known}"
            )
        return self

    # Derived once per (immutable) config, not on every admission review.
    @cached_property
    def native_sidecars(self) -> bool:
        match = _VERSION_RE.match(self.kubernetes_version)
        assert match is not None  # checked by the validator
        major, minor = int(match.group(1)), int(match.group(2))
        return (major, minor) >= (1, 29)

    @property
    def profile(self) -> PlatformProfile:
        return self.profiles[self.platform_profile]


class Webhook(_Model):
    name: str = "inject.juicefs.bentoml.com"
    configuration_name: str = "bento-juicefs-injector"
    namespace: str = "bento-juicefs-system"
    service_name: str = "bento-juicefs-injector"
    excluded_namespaces: tuple[str, ...] = ("kube-system", "kube-public", "kube-node-lease")
    # Replicas share one CA through this Secret; the CA's certificate is the
    # caBundle the injector keeps patched into its webhook configuration.
    ca_secret_name: str = "bento-juicefs-injector-ca"
    manage_ca_bundle: bool = True
    ca_bundle_check_seconds: float = Field(default=30.0, gt=0)


class Controller(_Model):
    """The namespace controller: the JuiceFS credentials per opted-in namespace."""

    enabled: bool = True
    resync_seconds: float = Field(default=60.0, gt=0)
    # Objects the controller owns carry this label, and only those are deleted.
    managed_by: str = "bento-juicefs-injector"


class Server(_Model):
    host: str = "0.0.0.0"
    port: int = Field(default=9443, ge=1, le=65535)
    cert_dir: str = "/var/run/bento-juicefs/certs"
    cert_file: str = "tls.crt"
    key_file: str = "tls.key"
    ca_file: str = "ca.crt"
    # Generate a self-signed CA and serving cert when none are in cert_dir;
    # off when cert-manager provides the files.
    self_signed: bool = True
    cert_check_interval_seconds: float = Field(default=10.0, gt=0)
    max_body_bytes: int = Field(default=3 * 1024 * 1024, ge=1024)
    # On SIGTERM: fail /readyz, keep serving this long, then close.
    shutdown_delay_seconds: float = Field(default=5.0, ge=0)
    # Slow or idle clients: a connection without a complete request header this
    # long after it opened or after its last response is closed (longer than
    # the apiserver's 90 s idle timeout, so the apiserver closes idle ones first).
    idle_timeout_seconds: float = Field(default=120.0, gt=0)
    body_timeout_seconds: float = Field(default=10.0, gt=0)
    tls_handshake_timeout_seconds: float = Field(default=10.0, gt=0)
    # Floods: a body this large or larger is parsed and decided in a worker
    # thread, so the event loop keeps answering /healthz and small reviews
    # meanwhile (deciding costs about 10 us per KB: 64 KiB, under 1 ms inline).
    offload_body_bytes: int = Field(default=64 * 1024, ge=0)
    # Reviews in a worker thread or queued for one; each holds its body (up to
    # maxBodyBytes), so this bounds their memory. Small reviews never count:
    # on the event loop one cannot overlap another.
    max_reviews_in_flight: int = Field(default=16, ge=1, le=4096)
    # How long a review past that bound waits for a place before HTTP 429;
    # below the webhook's timeoutSeconds (the MutatingWebhookConfiguration's,
    # the chart's webhook.timeoutSeconds: the chart checks), so the apiserver
    # can still retry.
    review_queue_seconds: float = Field(default=1.0, gt=0, le=10)


def _check_volumes(juicefs: JuiceFS) -> None:
    """Volume names, the default among them, and namespace bindings of known volumes only."""
    for volume in juicefs.allowed_volumes:
        # It names a directory on the node (the node cache): one path component.
        if not env.is_bento_name(volume):
            raise ValueError(
                f"juicefs.allowedVolumes: {volume!r} is not a JuiceFS volume name ({env.NAME_FORM})"
            )
    if juicefs.default_volume not in juicefs.allowed_volumes:
        raise ValueError(
            f"juicefs.defaultVolume {juicefs.default_volume!r} "
            "must be one of juicefs.allowedVolumes"
        )
    for volume, namespaces in juicefs.volume_namespaces.items():
        if volume not in juicefs.allowed_volumes:
            raise ValueError(
                f"juicefs.volumeNamespaces: {volume!r} is not one of juicefs.allowedVolumes "
                f"({', '.join(juicefs.allowed_volumes)})"
            )
        for namespace in namespaces:
            if namespace != ALL_NAMESPACES and not _NAMESPACE_NAME.fullmatch(namespace):
                raise ValueError(
                    f"juicefs.volumeNamespaces.{volume}: {namespace!r} is not a namespace "
                    "name (a DNS label: lowercase letters, digits and '-', at most 63) "
                    f"or {ALL_NAMESPACES!r}"
                )


class InjectorConfig(_Model):
    labels: Labels = Labels()
    annotations: Annotations = Annotations()
    sidecar: Sidecar = Sidecar()
    volumes: Volumes = Volumes()
    models: Models = Models()
    juicefs: JuiceFS = JuiceFS()
    cache: Cache = Cache()
    warmup: Warmup = Warmup()
    readiness: Readiness = Readiness()
    scheduling: Scheduling = Scheduling()
    cluster: Cluster = Cluster()
    webhook: Webhook = Webhook()
    controller: Controller = Controller()
    server: Server = Server()

    @model_validator(mode="after")
    def _consistent(self) -> InjectorConfig:
        _check_volumes(self.juicefs)
        lo = parse_quantity(self.juicefs.min_cache_size)
        hi = parse_quantity(self.juicefs.max_cache_size)
        default = parse_quantity(self.juicefs.default_cache_size)
        if not lo <= default <= hi:
            raise ValueError(
                "juicefs.defaultCacheSize must lie between minCacheSize and maxCacheSize"
            )
        budget = parse_quantity(self.cache.node_budget)
        if budget < parse_quantity("1Gi") or budget != budget.to_integral_value():
            raise ValueError("cache.nodeBudget must be a whole number of bytes, at least 1Gi")
        if self.cache.mode == "node" and self.node_cache_path is None:
            raise ValueError(
                f"cache.mode is node but profile {self.cluster.platform_profile!r} has no "
                "nodeCachePath: set cache.nodePath or cache.mode: pod"
            )
        if self.cache_mode == "node" and self.volumes.cache_medium == "Memory":
            raise ValueError(
                "volumes.cacheMedium Memory is for the pod cache, and cache.mode is node "
                f"(the {self.cluster.platform_profile} profile's default): set cache.mode: pod"
            )
        if self.scheduling.ssd_policy != "off" and self.ssd_node_label is None:
            raise ValueError(
                f"scheduling.ssdPolicy is {self.scheduling.ssd_policy} but profile "
                f"{self.cluster.platform_profile!r} has no ssdNodeLabel: set "
                "scheduling.ssdNodeLabel or scheduling.ssdPolicy: off"
            )
        return self

    @cached_property
    def ssd_node_label(self) -> NodeLabel | None:
        return self.scheduling.ssd_node_label or self.cluster.profile.ssd_node_label

    @cached_property
    def node_cache_path(self) -> str | None:
        """The node cache's directory on every node, if there is one."""
        return self.cache.node_path or self.cluster.profile.node_cache_path

    @cached_property
    def cache_mode(self) -> CacheMode:
        """The cache mode of pods that do not choose one by annotation."""
        if self.cache.mode is not None:
            return self.cache.mode
        return "node" if self.node_cache_path is not None else "pod"

    @cached_property
    def node_budget_bytes(self) -> int:
        return int(parse_quantity(self.cache.node_budget))

    def namespace_volumes(self, namespace: str) -> tuple[str, ...]:
        """The volumes namespace's pods may use and its credentials it receives, in
        juicefs.allowedVolumes order."""
        return tuple(
            volume
            for volume in self.juicefs.allowed_volumes
            if volume_open_to(self.juicefs.volume_namespaces.get(volume), namespace)
        )

    def namespace_default_volume(self, namespace: str) -> str | None:
        """The volume of a pod in namespace that names none: juicefs.defaultVolume when the
        namespace may use it, else the namespace's only volume; None when it has several
        (or none) and the pod must choose."""
        volumes = self.namespace_volumes(namespace)
        if self.juicefs.default_volume in volumes:
            return self.juicefs.default_volume
        return volumes[0] if len(volumes) == 1 else None

    @cached_property
    def excluded_namespaces(self) -> frozenset[str]:
        return frozenset((*self.webhook.excluded_namespaces, self.webhook.namespace))

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", by_alias=True)
        return yaml.safe_dump(data, sort_keys=False)


class ConfigError(Exception):
    """A config file that cannot be used; the message names the key and the problem."""


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"invalid config {source}:"]
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


# Keys earlier versions had, and why each went. A config that still sets one
# fails to load with that reason rather than as an unknown key: its author
# meant something by it, and should learn that it no longer holds.
REMOVED_KEYS: dict[tuple[str, ...], str] = {
    ("sidecar", "unprivileged"): (
        "the sidecar is always unprivileged and the node agent mounts for it"
    ),
    ("podSecurity",): (
        "what the injector adds passes Pod Security restricted, so it no longer "
        "needs to know what a namespace enforces"
    ),
    ("controller", "roleName"): (
        "no service account of a tenant namespace may set the readiness condition "
        "(the node agent sets it), so the controller binds no role there"
    ),
    ("volumes", "tokenName"): (
        "the sidecar holds no service-account token (it asks the node agent through "
        "its socket), so it gets no token volume"
    ),
    ("webhook", "timeoutSeconds"): (
        "it set nothing (the injector only checked reviewQueueSeconds against it); the "
        "apiserver's timeout is the MutatingWebhookConfiguration's "
        "timeoutSeconds (the Helm chart's webhook.timeoutSeconds), which must stay above "
        "server.reviewQueueSeconds"
    ),
}


_ABSENT = object()


def _lookup(data: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = data
    for part in path:
        node = node.get(part, _ABSENT) if isinstance(node, Mapping) else _ABSENT
    return node


def removed_keys(data: Mapping[str, Any]) -> list[str]:
    """What a config still sets of REMOVED_KEYS, each with why it went and what to do.

    Keys are found as written, camelCase or (as pydantic also reads them) snake_case.
    """
    found = []
    for camel, why in REMOVED_KEYS.items():
        for path in dict.fromkeys((camel, tuple(to_snake(part) for part in camel))):
            if _lookup(data, path) is not _ABSENT:
                found.append(f"{'.'.join(path)} was removed: {why}; delete the key")
    return found


def parse_config(data: Any, source: str = "<inline>") -> InjectorConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping")
    if removed := removed_keys(data):
        raise ConfigError("\n".join([f"invalid config {source}:", *(f"  {r}" for r in removed)]))
    try:
        return InjectorConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None


def load_config(path: str | Path | None) -> InjectorConfig:
    if path is None:
        return InjectorConfig()
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config {file}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config {file} is not valid YAML: {err}") from None
    return parse_config(data, str(file))
