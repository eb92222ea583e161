"""The contract between the injector and the sidecar: the sidecar's environment.

The injector writes these variables into the `juicefs-mount` container; the
sidecar reads nothing else. Each variable is defined once, here: its name,
its default (the injector config's default, so that a missing variable means
what the injector would have written), and the rule its value follows. The
injector renders values through the same rule the sidecar parses them with,
so it can never write what the sidecar would refuse; the injector's own
checks of pod annotations (SSD policy, warmup, model tags, Bento identity)
use the same functions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, get_args

T = TypeVar("T")

SsdPolicy = Literal["required", "preferred", "off"]
SSD_POLICIES: tuple[SsdPolicy, ...] = get_args(SsdPolicy)
SSD_POLICY_FORM = "'required', 'preferred' or 'off'"
# Where the JuiceFS block cache lives: the pod's own emptyDir, or a directory
# on the node's local SSD shared by every pod of the same JuiceFS volume.
CacheMode = Literal["pod", "node"]
CACHE_MODES: tuple[CacheMode, ...] = get_args(CacheMode)
CACHE_MODE_FORM = "'pod' or 'node'"
BOOL_FORM = "'true' or 'false'"

# BentoML tag components: lowercase name, version of letters, digits, . _ -.
# Anchored and free of "/" so a label or annotation can never escape the
# model tree in JuiceFS.
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")
NAME_FORM = (
    "lowercase letters, digits, '.', '_' or '-', starting and ending alphanumeric, "
    "at most 63 characters"
)
VERSION_FORM = (
    "letters, digits, '.', '_' or '-', starting and ending alphanumeric, at most 128 characters"
)
MODELS_FORM = "a comma-separated list of BentoML model tags, e.g. 'llama3:v1,tokenizer'"

# Defaults and bounds the injector's config takes from here.
DEFAULT_SSD_POLICY: SsdPolicy = "required"
DEFAULT_WARMUP = True
DEFAULT_WARMUP_TIMEOUT_SECONDS = 3600
MIN_WARMUP_TIMEOUT_SECONDS = 30
DEFAULT_WARMUP_CONCURRENCY = 8
MIN_WARMUP_CONCURRENCY = 1
MAX_WARMUP_CONCURRENCY = 256
DEFAULT_BUFFER_SIZE_MIB = 1024
MIN_BUFFER_SIZE_MIB = 64
DEFAULT_PREFETCH = 3
DEFAULT_CACHE_MIN_MBPS = 200.0
# The default profile (GKE) names a local-SSD path, so its default is the node cache.
DEFAULT_CACHE_MODE: CacheMode = "node"
# cache.nodeBudget (200Gi) in MiB.
DEFAULT_NODE_CACHE_BUDGET_MIB = 204800
# The node budget times juicefs.cacheFillRatio (0.9), in MiB: JuiceFS's own
# limit, what the injector writes with its default config (a test holds them together).
DEFAULT_CACHE_SIZE_MIB = 184320
# cache.nodeScanSeconds: how often each JuiceFS client on a node re-reads the
# shared cache directory, and so counts what the node's other clients wrote.
DEFAULT_CACHE_SCAN_SECONDS = 10
MIN_CACHE_SCAN_SECONDS = 1
MAX_CACHE_SCAN_SECONDS = 3600
DEFAULT_VOLUME = "models"
# sidecar.metricsPort: where the sidecar serves its own Prometheus metrics on
# the pod's IP. Not juicefs's (the sidecar gives each `juicefs mount` a free
# port from the kernel's ephemeral range, on 127.0.0.1) nor the node agent's
# (9464, in its own pod). 0: no endpoint.
DEFAULT_METRICS_PORT = 9465
METRICS_PORT_FORM = "a TCP port from 1 to 65535, or 0 for no metrics endpoint"
# The native sidecar's startup probe where the sidecar serves metrics: the
# kubelet's httpGet of STARTUP_PATH on that port. The sidecar answers 200 once
# the app's models are shown (mounted, or the node's copy bound), and
# otherwise holds the request for up to STARTUP_WAIT_SECONDS before its 503,
# so that the app starts the moment they are and a cold node's warm shows as
# one failed probe every STARTUP_WAIT_SECONDS. The exec probe (`sidecar probe
# --wait`, where no port is served) waits as long.
STARTUP_PATH = "/started"
STARTUP_WAIT_SECONDS = 20
# Where Kubernetes mounts a service-account token; the injector covers it in
# the sidecar with an empty directory (the sidecar holds no credential).
DEFAULT_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# The unprivileged sidecar's own volume (an emptyDir no other container
# mounts): the node agent's socket for this pod, and the private FUSE mount
# the agent makes there and hands over as a /dev/fuse descriptor.
# /run, not /var/run: mountinfo names the real path, and /var/run is a symlink
# to /run in the image, so a check of the private mount by its path would miss it.
AGENT_DIR = "/run/bento-juicefs/agent"
AGENT_SOCKET_NAME = "agent.sock"
AGENT_MOUNT_NAME = "volume"
# Where the node agent mounts for the sidecar: what the injector writes.
DEFAULT_PRIVATE_MOUNT = f"{AGENT_DIR}/{AGENT_MOUNT_NAME}"
# The uid and gid the unprivileged sidecar runs as: the image's own user.
SIDECAR_UID = 65532


class EnvError(ValueError):
    """A variable is missing or its value breaks its rule; the message says which and why."""


# The value rules. Each raises ValueError on a value it refuses.


def seals_before_mount(node_cache: bool, warmup: bool) -> bool:
    """Whether the sidecar waits for the node agent's seal before it mounts JuiceFS.

    On the node cache with warmup the agent streams the Bento into the node
    cache with its own client, and a pod's client mounted before that knows
    only the blocks its start-up scan found: the app reading through it on
    a cold node fetched every block a second time (4,196 MiB served for a
    2,048 MiB model). Mounted after the seal, its scan finds every block.
    The app's containers start once the mount answers, so the injector gives
    their startup the warmup's time as well as the mount's. Without warmup
    there is no seal to wait for.
    """
    return node_cache and warmup


def parse_ssd_policy(value: str) -> SsdPolicy:
    if value not in SSD_POLICIES:
        raise ValueError(value)
    return value


def parse_cache_mode(value: str) -> CacheMode:
    if value not in CACHE_MODES:
        raise ValueError(value)
    return value


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("true", "false"):
        raise ValueError(value)
    return lowered == "true"


def render_bool(value: bool) -> str:
    return "true" if value else "false"


def parse_metrics_port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError(value)
    return port


def is_bento_name(value: str) -> bool:
    # fullmatch: `$` alone would also accept a trailing newline.
    return bool(_NAME_RE.fullmatch(value))


def is_bento_version(value: str) -> bool:
    return bool(_VERSION_RE.fullmatch(value))


def parse_model_tags(value: str) -> tuple[str, ...]:
    """`name` or `name:version` tags, comma-separated; none may be empty."""
    tags = tuple(part.strip() for part in value.split(","))
    for tag in tags:
        name, _, version = tag.partition(":")
        if not is_bento_name(name) or (version and not is_bento_version(version)):
            raise ValueError(value)
    return tags


def _parse_models(value: str) -> tuple[str, ...]:
    # In the environment, empty means every model of the Bento.
    return parse_model_tags(value) if value else ()


def _matching(check: Callable[[str], bool]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if not check(value):
            raise ValueError(value)
        return value

    return parse


def _whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if number < minimum or (maximum is not None and number > maximum):
            raise ValueError(value)
        return number

    return parse


def _whole_form(unit: str, minimum: int, maximum: int | None = None) -> str:
    if maximum is None:
        return f"a whole number of {unit}, at least {minimum}"
    return f"a whole number of {unit} from {minimum} to {maximum}"


def _not_negative(value: str) -> float:
    number = float(value)
    if not number >= 0:  # also refuses nan
        raise ValueError(value)
    return number


def _optional(value: str) -> str | None:
    return value or None


def _render_optional(value: str | None) -> str:
    return value or ""


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    """One variable: its name, the rule for its value, and its default.

    Without a default the variable is required, and empty counts as unset.
    """

    name: str
    parse_value: Callable[[str], T]
    accepted: str
    default: str | None = None
    render_value: Callable[[T], str] = str

    def read(self, env: Mapping[str, str]) -> T:
        raw = env.get(self.name, "")
        if raw == "":
            if self.default is None:
                raise EnvError(f"environment variable {self.name} is not set")
            raw = self.default
        return self.parse(raw)

    def parse(self, raw: str) -> T:
        try:
            return self.parse_value(raw)
        except ValueError:
            shown = raw if len(raw) <= 64 else raw[:61] + "..."
            raise EnvError(f"{self.name}={shown!r} is invalid: expected {self.accepted}") from None

    def render(self, value: T) -> str:
        """The text the sidecar will read back as value (checked, so no drift goes unseen)."""
        text = self.render_value(value)
        if self.parse(text) != value:
            raise EnvError(f"{self.name}: {value!r} does not survive the round trip via {text!r}")
        return text

    def entry(self, value: T) -> dict[str, Any]:
        """The container env entry for value."""
        return {"name": self.name, "value": self.render(value)}


def _text(name: str, default: str | None = None) -> EnvVar[str]:
    return EnvVar(name, _matching(bool), "a non-empty value", default)


def _path(name: str, default: str | None = None) -> EnvVar[Path]:
    return EnvVar(name, lambda v: Path(_matching(bool)(v)), "a path", default)


def _count(
    name: str, unit: str, default: int, minimum: int, maximum: int | None = None
) -> EnvVar[int]:
    return EnvVar(name, _whole(minimum, maximum), _whole_form(unit, minimum, maximum), str(default))


# Set through the downward API.
POD_NAME = _text("POD_NAME")
POD_NAMESPACE = _text("POD_NAMESPACE")
POD_UID = EnvVar("POD_UID", str, "any value", "")
NODE_NAME = EnvVar("NODE_NAME", str, "any value", "")
# From the volume's credentials Secret (secretKeyRef, never literal).
META_URL = _text("JFS_META_URL")
ACCESS_KEY = EnvVar("JFS_ACCESS_KEY", _optional, "any value", "", _render_optional)
SECRET_KEY = EnvVar("JFS_SECRET_KEY", _optional, "any value", "", _render_optional)
# What the injection plan chose.
BENTO_NAME = EnvVar("BENTO_NAME", _matching(is_bento_name), NAME_FORM)
BENTO_VERSION = EnvVar("BENTO_VERSION", _matching(is_bento_version), VERSION_FORM)
VOLUME = _text("JFS_VOLUME", DEFAULT_VOLUME)
BENTO_PATH = _text("JFS_BENTO_PATH")
MODELS = EnvVar("JFS_MODELS", _parse_models, "empty (all) or " + MODELS_FORM, "", ",".join)
MOUNT_POINT = _path("JFS_MOUNT_POINT")
CACHE_DIR = _path("JFS_CACHE_DIR")
CACHE_MODE = EnvVar("JFS_CACHE_MODE", parse_cache_mode, CACHE_MODE_FORM, DEFAULT_CACHE_MODE)
# JuiceFS --cache-size: the pod cache's size, or the node budget, times juicefs.cacheFillRatio.
CACHE_SIZE_MIB = _count("JFS_CACHE_SIZE_MIB", "MiB", DEFAULT_CACHE_SIZE_MIB, 0)
# Node mode only: the budget every client of the node's cache directory keeps to.
NODE_CACHE_BUDGET_MIB = _count("JFS_NODE_CACHE_BUDGET_MIB", "MiB", DEFAULT_NODE_CACHE_BUDGET_MIB, 1)
CACHE_SCAN_SECONDS = _count(
    "JFS_CACHE_SCAN_SECONDS",
    "seconds",
    DEFAULT_CACHE_SCAN_SECONDS,
    MIN_CACHE_SCAN_SECONDS,
    MAX_CACHE_SCAN_SECONDS,
)
BUFFER_SIZE_MIB = _count("JFS_BUFFER_SIZE_MIB", "MiB", DEFAULT_BUFFER_SIZE_MIB, MIN_BUFFER_SIZE_MIB)
PREFETCH = _count("JFS_PREFETCH", "blocks", DEFAULT_PREFETCH, 0)
SSD_POLICY = EnvVar("JFS_SSD_POLICY", parse_ssd_policy, SSD_POLICY_FORM, DEFAULT_SSD_POLICY)
CACHE_MIN_MBPS = EnvVar(
    "JFS_CACHE_MIN_MBPS", _not_negative, "a number of MB/s, at least 0", str(DEFAULT_CACHE_MIN_MBPS)
)
WARMUP = EnvVar("JFS_WARMUP", parse_bool, BOOL_FORM, render_bool(DEFAULT_WARMUP), render_bool)
WARMUP_TIMEOUT_SECONDS = _count(
    "JFS_WARMUP_TIMEOUT_SECONDS",
    "seconds",
    DEFAULT_WARMUP_TIMEOUT_SECONDS,
    MIN_WARMUP_TIMEOUT_SECONDS,
)
WARMUP_CONCURRENCY = _count(
    "JFS_WARMUP_CONCURRENCY",
    "parallel reads",
    DEFAULT_WARMUP_CONCURRENCY,
    MIN_WARMUP_CONCURRENCY,
    MAX_WARMUP_CONCURRENCY,
)
CONDITION_TYPE = _text("JFS_CONDITION_TYPE")
METRICS_PORT = EnvVar(
    "JFS_METRICS_PORT", parse_metrics_port, METRICS_PORT_FORM, str(DEFAULT_METRICS_PORT)
)
# The node agent's socket for this pod: the sidecar gets its /dev/fuse
# descriptor through it, reports its Events and asks for the readiness
# condition (it holds no Kubernetes credential and no privilege). Required:
# there is no sidecar that mounts JuiceFS itself.
AGENT_SOCKET = _path("JFS_AGENT_SOCKET")
# PRIVATE_MOUNT is set by the injector (the agent volume's AGENT_MOUNT_NAME,
# where the node agent mounts for the sidecar). The
# others are not set by the injector: the defaults suit the container; tests
# that run the sidecar as a host process point them at temp dirs.
PRIVATE_MOUNT = _path("JFS_PRIVATE_MOUNT", DEFAULT_PRIVATE_MOUNT)
JUICEFS_BIN = _text("JFS_JUICEFS_BIN", "juicefs")

ALL: tuple[EnvVar[Any], ...] = (
    POD_NAME,
    POD_NAMESPACE,
    POD_UID,
    NODE_NAME,
    META_URL,
    ACCESS_KEY,
    SECRET_KEY,
    BENTO_NAME,
    BENTO_VERSION,
    VOLUME,
    BENTO_PATH,
    MODELS,
    MOUNT_POINT,
    CACHE_DIR,
    CACHE_MODE,
    CACHE_SIZE_MIB,
    NODE_CACHE_BUDGET_MIB,
    CACHE_SCAN_SECONDS,
    BUFFER_SIZE_MIB,
    PREFETCH,
    SSD_POLICY,
    CACHE_MIN_MBPS,
    WARMUP,
    WARMUP_TIMEOUT_SECONDS,
    WARMUP_CONCURRENCY,
    CONDITION_TYPE,
    METRICS_PORT,
    AGENT_SOCKET,
    PRIVATE_MOUNT,
    JUICEFS_BIN,
)
