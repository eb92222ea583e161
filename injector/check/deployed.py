"""Which config the check judges the cluster by: a file given, else the one deployed.

Without `--config` the check reads the injector's ConfigMap (what the
Deployment mounts and `serve --config` loads) and parses its `config.yaml`
with the injector's own parser, so a cluster is judged by the config it
runs. When the ConfigMap is missing or cannot be read, the defaults stand
in, and a `config-source` line says so: every other verdict is then about
the defaults. `-n` moves the whole check to another namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from injector.check.rows import CheckId, Row, Verdict
from injector.check.state import Obj, Unreadable
from injector.config import ConfigError, InjectorConfig, Webhook, parse_config

# manifests/base/config.yaml and the chart's templates/config.yaml: the
# Deployment mounts this key of this ConfigMap as /etc/bento-juicefs/config.yaml.
CONFIGMAP_NAME = "bento-juicefs-injector-config"
CONFIGMAP_KEY = "config.yaml"
DEFAULT_NAMESPACE = Webhook().namespace
DEFAULTS = "(defaults)"

CHECK: CheckId = "config-source"


@dataclass(frozen=True)
class ConfigChoice:
    """The config to check against, where it came from, and a line when it is not the one meant."""

    config: InjectorConfig
    source: str
    rows: tuple[Row, ...] = ()


def configmap_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/configmaps/{CONFIGMAP_NAME}"


def deployed_config(configmap: Obj | Unreadable | None, namespace: str) -> ConfigChoice:
    """The config in the injector's ConfigMap; the defaults, and a line saying why, without it."""
    where = f"{namespace}/{CONFIGMAP_NAME}"
    subject = f"ConfigMap {where}"
    fix = "pass the injector's config with --config FILE"
    if isinstance(configmap, Unreadable):
        return _defaults(
            "warn",
            subject,
            f"cannot read it: {configmap.reason}; checked against the defaults",
            f"run the check with a kubeconfig that may read it, or {fix}",
        )
    if configmap is None:
        return _defaults(
            "warn",
            subject,
            "not found: checked against the defaults (is the injector installed in "
            f"namespace {namespace}?)",
            f"name the injector's namespace with -n NAMESPACE, or {fix}",
        )
    text = (configmap.get("data") or {}).get(CONFIGMAP_KEY)
    if not isinstance(text, str):
        return _defaults(
            "warn",
            subject,
            f"it has no {CONFIGMAP_KEY} key: checked against the defaults",
            f"{fix}; the injector loads its {CONFIGMAP_KEY} (manifests/base/config.yaml)",
        )
    source = f"configmap {where}"
    try:
        return ConfigChoice(parse_config(_yaml(text, source), source), source)
    except ConfigError as err:
        return _defaults(
            "FAIL",
            subject,
            f"{err}; the injector does not start with it; checked against the defaults",
            f"correct {CONFIGMAP_KEY} (docs/configuration.md); try it with "
            "python -m injector config --config FILE",
        )


def with_namespace(config: InjectorConfig, namespace: str) -> InjectorConfig:
    """The config with the injector's namespace replaced (parsed again: nothing derived stale)."""
    data = config.model_dump(mode="json", by_alias=True)
    data["webhook"]["namespace"] = namespace
    return parse_config(data, f"-n {namespace}")


def _yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config {source} is not valid YAML: {err}") from None


def _defaults(verdict: Verdict, subject: str, found: str, fix: str) -> ConfigChoice:
    return ConfigChoice(InjectorConfig(), DEFAULTS, (Row(CHECK, subject, verdict, found, fix),))
