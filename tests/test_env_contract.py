"""The env contract (common.env) seen from both ends.

What the injector writes into the sidecar container, resolved the way the
kubelet would, must parse with the sidecar's own `Settings.from_env` into
exactly what the injection plan chose; and a value the injector would refuse
is refused by the sidecar too, with a message naming the variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common import env
from injector.config import InjectorConfig
from injector.mutation.metrics_port import pod_metrics_port
from injector.plan import InjectionPlan, decide
from sidecar.env import Settings, SettingsError
from tests.helpers import GOLDEN_CASES, bento_pod, case_config, inject, injected_pods, minimal_env

MIB = 2**20
FIELDS = {
    "metadata.name": "pod-from-downward-api",
    "metadata.namespace": "namespace-from-downward-api",
    "metadata.uid": "0f3c5e0e-uid",
    "spec.nodeName": "node-from-downward-api",
}


def secret_value(ref: dict[str, Any]) -> str:
    return f"secret {ref['name']}/{ref['key']}"


def resolve(entries: list[dict[str, Any]]) -> dict[str, str]:
    """The container's env as the kubelet hands it over, with fixed fake references."""
    resolved: dict[str, str] = {}
    for entry in entries:
        if "value" in entry:
            resolved[entry["name"]] = entry["value"]
            continue
        source = entry["valueFrom"]
        if "fieldRef" in source:
            resolved[entry["name"]] = FIELDS[source["fieldRef"]["fieldPath"]]
        else:
            resolved[entry["name"]] = secret_value(source["secretKeyRef"])
    return resolved


def sidecar_env(pod: dict[str, Any], config: InjectorConfig) -> list[dict[str, Any]]:
    name = config.sidecar.container_name
    spec = pod["spec"]
    containers = [*(spec.get("initContainers") or []), *spec["containers"]]
    found = [c for c in containers if c["name"] == name]
    assert len(found) == 1
    entries: list[dict[str, Any]] = found[0]["env"]
    return entries


def injected_pod_params() -> list[Any]:
    """(case, namespace, pod) for every pod a golden case injects."""
    return [
        pytest.param(case, namespace, pod, id=f"{case.stem}-{index}")
        for case in GOLDEN_CASES
        for index, (namespace, pod) in enumerate(injected_pods(case))
    ]


INJECTED = injected_pod_params()


def test_enough_injected_pods() -> None:
    assert len(INJECTED) >= 20


def expected_settings(
    plan: InjectionPlan, config: InjectorConfig, spec: dict[str, Any]
) -> dict[str, Any]:
    jfs = config.juicefs
    node = plan.cache_mode == "node"
    limit = config.node_budget_bytes if node else plan.cache_bytes
    return {
        "pod_name": FIELDS["metadata.name"],
        "pod_namespace": FIELDS["metadata.namespace"],
        "pod_uid": FIELDS["metadata.uid"],
        "node_name": FIELDS["spec.nodeName"],
        "meta_url": secret_value({"name": plan.secret_name, "key": jfs.meta_url_key}),
        "access_key": secret_value({"name": plan.secret_name, "key": jfs.access_key_key}),
        "secret_key": secret_value({"name": plan.secret_name, "key": jfs.secret_key_key}),
        "bento_name": plan.bento_name,
        "bento_version": plan.bento_version,
        "volume": plan.volume,
        "bento_path": plan.juicefs_path,
        "models": plan.models,
        "mount_point": Path(config.volumes.mount_path),
        "cache_dir": Path(config.volumes.cache_path),
        "cache_mode": plan.cache_mode,
        "cache_size_mib": int(limit * jfs.cache_fill_ratio) // MIB,
        # Written in node mode only; otherwise the contract's defaults.
        "node_cache_budget_mib": config.node_budget_bytes // MIB
        if node
        else env.DEFAULT_NODE_CACHE_BUDGET_MIB,
        "cache_scan_seconds": config.cache.node_scan_seconds
        if node
        else env.DEFAULT_CACHE_SCAN_SECONDS,
        "buffer_size_mib": jfs.buffer_size_mib,
        "prefetch": jfs.prefetch,
        "ssd_policy": plan.ssd_policy,
        "cache_min_mbps": config.warmup.cache_min_mbps,
        "warmup": plan.warmup,
        "warmup_timeout_seconds": plan.warmup_timeout_seconds,
        "warmup_concurrency": config.warmup.concurrency,
        "condition_type": config.readiness.condition_type,
        # 0 where the pod's own network would clash (hostNetwork, a declared port).
        "metrics_port": pod_metrics_port(
            spec, config.sidecar.metrics_port, config.sidecar.container_name
        ),
    }


@pytest.mark.parametrize(("case", "namespace", "pod"), INJECTED)
def test_sidecar_reads_back_what_the_plan_chose(
    case: Path, namespace: str, pod: dict[str, Any]
) -> None:
    config = case_config(case)
    plan = decide(pod, namespace, config)
    assert isinstance(plan, InjectionPlan), plan
    entries = sidecar_env(pod, config)
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), "a variable is written twice"
    assert set(names) <= {var.name for var in env.ALL}, "a variable outside the contract"

    settings = Settings.from_env(resolve(entries))

    expected = expected_settings(plan, config, pod["spec"])
    actual = {key: getattr(settings, key) for key in expected}
    assert actual == expected


def test_the_sidecar_defaults_are_what_the_default_config_writes() -> None:
    """A variable left out means what the injector would have written."""
    written = {
        entry["name"]: entry["value"]
        for entry in sidecar_env(inject(bento_pod()), InjectorConfig())
        if "value" in entry
    }
    for var in env.ALL:
        if var.name in written and var.default is not None:
            assert var.parse(written[var.name]) == var.parse(var.default), var.name


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("JFS_SSD_POLICY", "fast", "'required', 'preferred' or 'off'"),
        ("JFS_SSD_POLICY", "Required", "'required', 'preferred' or 'off'"),
        ("JFS_WARMUP", "yes", "'true' or 'false'"),
        ("JFS_WARMUP_TIMEOUT_SECONDS", "10", "at least 30"),
        ("JFS_WARMUP_CONCURRENCY", "0", "from 1 to 256"),
        ("JFS_WARMUP_CONCURRENCY", "1000", "from 1 to 256"),
        ("JFS_BUFFER_SIZE_MIB", "32", "at least 64"),
        ("JFS_PREFETCH", "-1", "at least 0"),
        ("JFS_CACHE_SIZE_MIB", "big", "a whole number of MiB"),
        ("JFS_CACHE_MODE", "shared", "'pod' or 'node'"),
        ("JFS_NODE_CACHE_BUDGET_MIB", "0", "at least 1"),
        ("JFS_CACHE_SCAN_SECONDS", "0", "from 1 to 3600"),
        ("JFS_CACHE_MIN_MBPS", "nan", "at least 0"),
        ("JFS_METRICS_PORT", "65536", "a TCP port from 1 to 65535, or 0"),
        ("JFS_METRICS_PORT", "-1", "a TCP port from 1 to 65535, or 0"),
        ("JFS_MODELS", "llama3:v1,,tokenizer", "BentoML model tags"),
        ("BENTO_NAME", "../etc", "lowercase letters"),
        ("BENTO_VERSION", "v1/../../x", "letters, digits"),
    ],
)
def test_a_value_the_injector_would_refuse_is_refused(name: str, value: str, accepted: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(minimal_env(**{name: value}))
    message = str(caught.value)
    assert f"{name}={value!r} is invalid" in message
    assert accepted in message


def test_defaults_fill_what_is_left_out() -> None:
    settings = Settings.from_env(minimal_env())
    assert settings.buffer_size_mib == env.DEFAULT_BUFFER_SIZE_MIB == 1024
    assert settings.prefetch == env.DEFAULT_PREFETCH == 3
    assert settings.ssd_policy == "required"
    assert settings.warmup is True
    assert settings.models == ()
    assert settings.access_key is None


def test_injector_refuses_to_write_what_does_not_round_trip() -> None:
    with pytest.raises(env.EnvError, match="JFS_SSD_POLICY"):
        env.SSD_POLICY.render("fast")  # type: ignore[arg-type]
    assert env.MODELS.render(("llama3:v1", "tokenizer")) == "llama3:v1,tokenizer"
