"""Decide what to do with a pod: skip it, deny it, or inject it with a plan.

All of a pod's choices (its labels, its annotation overrides, the config) are
resolved and validated here, once, into an `InjectionPlan`; the mutation
steps only read the plan. Nothing here does I/O.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from common.env import (
    BOOL_FORM,
    CACHE_MODE_FORM,
    MIN_WARMUP_TIMEOUT_SECONDS,
    MODELS_FORM,
    NAME_FORM,
    SSD_POLICY_FORM,
    VERSION_FORM,
    CacheMode,
    SsdPolicy,
    is_bento_name,
    is_bento_version,
    parse_bool,
    parse_cache_mode,
    parse_model_tags,
    parse_ssd_policy,
)
from injector.config import InjectorConfig
from injector.quantity import (
    DURATION_FORM,
    QUANTITY_FORM,
    QuantityError,
    parse_duration_seconds,
    parse_quantity,
)

Pod = Mapping[str, Any]
# A pod's annotation for a key, as a string; None when the pod does not set it.
Override = Callable[[str], str | None]
T = TypeVar("T")

# The Bento identity, model tags, SSD policy and booleans follow the same
# rules as the sidecar's environment (common.env), which carries them on.
MIN_WARMUP_TIMEOUT = MIN_WARMUP_TIMEOUT_SECONDS
MAX_WARMUP_TIMEOUT = 24 * 3600


@dataclass(frozen=True)
class Skip:
    reason: str


@dataclass(frozen=True)
class Deny:
    """Refuse the pod; each problem names its label or annotation and what is accepted."""

    message: str
    problems: tuple[str, ...] = ()

    @classmethod
    def of(cls, problems: list[str]) -> Deny:
        return cls("; ".join(problems), tuple(problems))


@dataclass(frozen=True)
class SidecarResources:
    cpu_request: str
    memory_request: str
    cpu_limit: str | None
    memory_limit: str | None


@dataclass(frozen=True)
class InjectionPlan:
    bento_name: str
    bento_version: str
    models: tuple[str, ...]
    volume: str
    secret_name: str
    juicefs_path: str
    # The pod cache's size (emptyDir sizeLimit); unused by the node cache.
    cache_size: str
    cache_bytes: int
    cache_mode: CacheMode
    # Node mode: the volume's node cache directory (hostPath), from config alone.
    node_cache_dir: str | None
    ssd_policy: SsdPolicy
    resources: SidecarResources
    warmup: bool
    warmup_timeout_seconds: int
    sidecar_mode: Literal["native", "classic"]
    # The pod carries our status annotation: names that match ours are ours,
    # not clashes, and only what is missing gets added.
    already_injected: bool


Decision = Skip | Deny | InjectionPlan


def _labels(pod: Pod) -> Mapping[str, Any]:
    return (pod.get("metadata") or {}).get("labels") or {}


def _annotations(pod: Pod) -> Mapping[str, Any]:
    return (pod.get("metadata") or {}).get("annotations") or {}


def is_selected(pod: Pod, config: InjectorConfig) -> bool:
    labels = _labels(pod)
    return bool(labels.get(config.labels.model_store) == config.labels.model_store_value)


def shown(value: object) -> str:
    """A pod's value quoted for a message: at most 64 characters of it."""
    text = str(value)
    return repr(text if len(text) <= 64 else text[:61] + "...")


def _bad(key: str, value: str, form: str, kind: str = "annotation") -> str:
    return f"{kind} {key}={shown(value)} is invalid: expected {form}"


def _parse_models(key: str, value: str, errors: list[str]) -> tuple[str, ...]:
    try:
        return parse_model_tags(value)
    except ValueError:
        errors.append(_bad(key, value, MODELS_FORM))
        return ()


def _parse_quantity(
    key: str,
    value: str,
    errors: list[str],
    bounds: tuple[str, str] | None = None,
    whole_bytes: bool = False,
) -> int:
    try:
        amount = parse_quantity(value)
    except QuantityError:
        errors.append(_bad(key, value, QUANTITY_FORM))
        return 0
    if amount <= 0:
        errors.append(_bad(key, value, "a size above zero"))
        return 0
    if whole_bytes and amount != amount.to_integral_value():
        errors.append(_bad(key, value, "a whole number of bytes, e.g. 512Mi or 4Gi"))
        return 0
    if bounds is not None:
        lo, hi = bounds
        if not parse_quantity(lo) <= amount <= parse_quantity(hi):
            errors.append(_bad(key, value, f"a size between {lo} and {hi}"))
            return 0
    return int(amount)


def _parse_bool(key: str, value: str, errors: list[str]) -> bool:
    try:
        return parse_bool(value)
    except ValueError:
        errors.append(_bad(key, value, BOOL_FORM))
        return False


def _resources(config: InjectorConfig, override: Override, errors: list[str]) -> SidecarResources:
    """Sidecar requests and limits: config defaults, overridden per pod.

    A limit below its request is invalid; when the pod set both, say so;
    when only the request was raised, raise the default limit with it.
    """
    ann, defaults = config.annotations, config.sidecar.resources
    chosen: dict[str, str | None] = {}
    for kind, req_key, lim_key, req_default, lim_default in (
        ("cpu", ann.sidecar_cpu, ann.sidecar_cpu_limit, defaults.cpu_request, defaults.cpu_limit),
        (
            "memory",
            ann.sidecar_memory,
            ann.sidecar_memory_limit,
            defaults.memory_request,
            defaults.memory_limit,
        ),
    ):
        whole = kind == "memory"
        request, limit = override(req_key), override(lim_key)
        for key, raw in ((req_key, request), (lim_key, limit)):
            if raw is not None:
                _parse_quantity(key, raw, errors, whole_bytes=whole)
        final_request = request if request is not None else req_default
        final_limit = limit if limit is not None else lim_default
        if final_limit is not None and _below(final_limit, final_request):
            if limit is not None:
                errors.append(
                    f"annotation {lim_key}={shown(limit)} is below the {kind} request "
                    f"{shown(final_request)} ({req_key}): expected a limit at least its request"
                )
            else:
                final_limit = final_request
        chosen[f"{kind}_request"], chosen[f"{kind}_limit"] = final_request, final_limit
    return SidecarResources(
        cpu_request=chosen["cpu_request"] or defaults.cpu_request,
        memory_request=chosen["memory_request"] or defaults.memory_request,
        cpu_limit=chosen["cpu_limit"],
        memory_limit=chosen["memory_limit"],
    )


def _below(limit: str, request: str) -> bool:
    try:
        return parse_quantity(limit) < parse_quantity(request)
    except QuantityError:
        return False  # already reported


def _is_status(value: str) -> bool:
    """Whether value could be the status annotation the injector writes: a JSON object."""
    try:
        return isinstance(json.loads(value), dict)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        return False


def _screen(pod: Pod, namespace: str, config: InjectorConfig) -> Skip | Deny | None:
    """Skip or deny before any validation: the namespace, the selector label, the opt-out."""
    keys = config.labels
    if namespace in config.excluded_namespaces:
        return Skip(f"namespace {namespace} is never mutated")
    if not is_selected(pod, config):
        return Skip(f"pod lacks label {keys.model_store}={keys.model_store_value}")
    opt_out = _labels(pod).get(keys.inject)
    if opt_out is None or opt_out == "true":
        return None
    # Exact, like the webhook's objectSelector and the admission policy:
    # "False" would be skipped here but still be held to the policy.
    if opt_out == "false":
        return Skip(f"pod opted out with {keys.inject}=false")
    return Deny.of([_bad(keys.inject, opt_out, "'true' or 'false' (lowercase)", "label")])


def _identity(pod: Pod, config: InjectorConfig, errors: list[str]) -> dict[str, str]:
    """The Bento's name and version labels, by label key, when valid."""
    labels, keys = _labels(pod), config.labels
    identity: dict[str, str] = {}
    for label, valid, what, form in (
        (keys.bento_repository, is_bento_name, "name", NAME_FORM),
        (keys.bento_version, is_bento_version, "version", VERSION_FORM),
    ):
        value = labels.get(label)
        if not value:
            errors.append(
                f"pod is marked {keys.model_store}={keys.model_store_value} "
                f"but has no {label} label: expected the Bento's {what} ({form}), "
                "which the Bento deployment sets"
            )
        elif not valid(str(value)):
            errors.append(_bad(label, str(value), form, "label"))
        else:
            identity[label] = str(value)
    return identity


def _overrides(pod: Pod) -> Override:
    """The pod's annotation for a key, as a string; None when the pod does not set it."""
    annotations = _annotations(pod)

    def override(key: str) -> str | None:
        value = annotations.get(key)
        return None if value is None else str(value)

    return override


def _check_status(config: InjectorConfig, override: Override, errors: list[str]) -> None:
    key = config.annotations.status
    if (raw := override(key)) is not None and not _is_status(raw):
        errors.append(_bad(key, raw, "the injector's own JSON object: it cannot be set by hand"))


def _models(config: InjectorConfig, override: Override, errors: list[str]) -> tuple[str, ...]:
    key = config.annotations.models
    if (raw := override(key)) is None:
        return ()
    return _parse_models(key, raw, errors)


def _volume(config: InjectorConfig, namespace: str, override: Override, errors: list[str]) -> str:
    """The pod's volume: its annotation's, else the namespace's default; only among
    the volumes the administrator assigned to the namespace (juicefs.volumeNamespaces)."""
    key, allowed = config.annotations.volume, config.namespace_volumes(namespace)
    if (raw := override(key)) is None:
        if (default := config.namespace_default_volume(namespace)) is not None:
            return default
        errors.append(
            f"namespace {namespace!r} may use several volumes and none is the default: "
            f"annotate the pod with {key}: {_volumes_named(allowed)}"
            if allowed
            else f"namespace {namespace!r} may use no volume: none is assigned to it "
            "(juicefs.volumeNamespaces)"
        )
        return config.juicefs.default_volume
    if raw not in allowed:
        if raw in config.juicefs.allowed_volumes:
            errors.append(
                f"annotation {key}={shown(raw)} names a volume namespace {namespace!r} may not "
                f"use (juicefs.volumeNamespaces): expected {_volumes_named(allowed)}"
            )
        else:
            errors.append(
                _bad(key, raw, f"{_volumes_named(allowed)} (the volumes of {namespace!r})")
            )
    return raw


def _volumes_named(volumes: tuple[str, ...]) -> str:
    return f"one of {', '.join(volumes)}" if volumes else "no volume (none is assigned to it)"


def _cache_size(config: InjectorConfig, override: Override, errors: list[str]) -> tuple[str, int]:
    """The pod cache's size as written and in bytes (0 when invalid)."""
    key, jfs = config.annotations.cache_size, config.juicefs
    cache_size = override(key)
    if cache_size is None:
        cache_size = jfs.default_cache_size
    bounds = (jfs.min_cache_size, jfs.max_cache_size)
    return cache_size, _parse_quantity(key, cache_size, errors, bounds, whole_bytes=True)


def _overridden(
    override: Override, key: str, parse: Callable[[str], T], form: str, errors: list[str]
) -> tuple[str, T] | None:
    """The pod's annotation for key, as written and parsed; None when the pod
    does not set it, or when it does not parse (the problem added to errors)."""
    if (raw := override(key)) is None:
        return None
    try:
        return raw, parse(raw)
    except ValueError:
        errors.append(_bad(key, raw, form))
        return None


def _cache_mode(config: InjectorConfig, override: Override, errors: list[str]) -> CacheMode:
    key = config.annotations.cache_mode
    if (got := _overridden(override, key, parse_cache_mode, CACHE_MODE_FORM, errors)) is None:
        return config.cache_mode
    raw, cache_mode = got
    if cache_mode == "node" and config.node_cache_path is None:
        errors.append(
            f"annotation {key}={shown(raw)} needs a node cache directory, and "
            f"profile {config.cluster.platform_profile!r} names none (cache.nodePath): "
            "expected 'pod'"
        )
    return cache_mode


def _node_cache_dir(config: InjectorConfig, cache_mode: CacheMode, volume: str) -> str | None:
    if cache_mode != "node" or config.node_cache_path is None:
        return None
    # The volume is one of juicefs.allowedVolumes, each a single path component.
    return posixpath.join(config.node_cache_path, volume)


def _ssd_policy(config: InjectorConfig, override: Override, errors: list[str]) -> SsdPolicy:
    key = config.annotations.ssd_policy
    if (got := _overridden(override, key, parse_ssd_policy, SSD_POLICY_FORM, errors)) is None:
        return config.scheduling.ssd_policy
    raw, ssd_policy = got
    if raw != "off" and config.ssd_node_label is None:
        errors.append(
            f"annotation {key}={shown(raw)} needs a local-SSD node label, and "
            "none is configured (scheduling.ssdNodeLabel): expected 'off'"
        )
    return ssd_policy


def _warmup(config: InjectorConfig, override: Override, errors: list[str]) -> bool:
    key = config.annotations.warmup
    if (raw := override(key)) is None:
        return config.warmup.enabled
    return _parse_bool(key, raw, errors)


def _warmup_timeout(config: InjectorConfig, override: Override, errors: list[str]) -> int:
    key = config.annotations.warmup_timeout
    got = _overridden(override, key, parse_duration_seconds, DURATION_FORM, errors)
    if got is None:
        return config.warmup.timeout_seconds
    raw, timeout = got
    if not MIN_WARMUP_TIMEOUT <= timeout <= MAX_WARMUP_TIMEOUT:
        errors.append(_bad(key, raw, "a duration between 30s and 24h"))
    return timeout


def decide(pod: Pod, namespace: str, config: InjectorConfig) -> Decision:
    """Skip, deny (with every problem, in a fixed order) or plan the pod's injection."""
    if (screened := _screen(pod, namespace, config)) is not None:
        return screened
    errors: list[str] = []
    identity = _identity(pod, config, errors)
    override = _overrides(pod)
    _check_status(config, override, errors)
    models = _models(config, override, errors)
    volume = _volume(config, namespace, override, errors)
    cache_size, cache_bytes = _cache_size(config, override, errors)
    cache_mode = _cache_mode(config, override, errors)
    ssd_policy = _ssd_policy(config, override, errors)
    resources = _resources(config, override, errors)
    warmup = _warmup(config, override, errors)
    timeout = _warmup_timeout(config, override, errors)
    if errors:
        return Deny.of(errors)

    keys = config.labels
    name, version = identity[keys.bento_repository], identity[keys.bento_version]
    return InjectionPlan(
        bento_name=name,
        bento_version=version,
        models=models,
        volume=volume,
        secret_name=config.juicefs.secret_name_template.format(volume=volume),
        juicefs_path=config.models.juicefs_path_template.format(name=name, version=version),
        cache_size=cache_size,
        cache_bytes=cache_bytes,
        cache_mode=cache_mode,
        node_cache_dir=_node_cache_dir(config, cache_mode, volume),
        ssd_policy=ssd_policy,
        resources=resources,
        warmup=warmup,
        warmup_timeout_seconds=timeout,
        sidecar_mode="native" if config.cluster.native_sidecars else "classic",
        already_injected=config.annotations.status in _annotations(pod),
    )
