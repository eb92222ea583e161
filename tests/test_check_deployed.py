"""Which config the check judges by: the injector's ConfigMap, else the defaults and a line why."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

import injector.check.fetch
from injector.check.deployed import (
    CONFIGMAP_NAME,
    DEFAULTS,
    ConfigChoice,
    deployed_config,
    with_namespace,
)
from injector.check.fetch import ApiReader, check_cluster, choose_config
from injector.check.state import Unreadable
from injector.config import InjectorConfig

HOME = "bento-juicefs-system"
SUBJECT = f"ConfigMap {HOME}/{CONFIGMAP_NAME}"


def configmap(text: str | None) -> dict[str, Any]:
    data = {} if text is None else {"config.yaml": text}
    return {"metadata": {"name": CONFIGMAP_NAME, "namespace": HOME}, "data": data}


def test_the_deployed_config_is_parsed_and_named() -> None:
    text = yaml.safe_dump(
        {"cluster": {"platformProfile": "eks"}, "scheduling": {"ssdPolicy": "preferred"}}
    )
    choice = deployed_config(configmap(text), HOME)
    assert choice.source == f"configmap {HOME}/{CONFIGMAP_NAME}"
    assert choice.rows == ()
    assert choice.config.cluster.platform_profile == "eks"
    assert choice.config.scheduling.ssd_policy == "preferred"


def test_an_empty_config_yaml_is_the_defaults_as_deployed() -> None:
    choice = deployed_config(configmap(""), HOME)
    assert (choice.config, choice.source, choice.rows) == (
        InjectorConfig(),
        f"configmap {HOME}/{CONFIGMAP_NAME}",
        (),
    )


def test_a_missing_configmap_falls_back_to_the_defaults_with_a_warning() -> None:
    choice = deployed_config(None, HOME)
    assert (choice.config, choice.source) == (InjectorConfig(), DEFAULTS)
    (row,) = choice.rows
    assert (row.id, row.subject, row.verdict) == ("config-source", SUBJECT, "warn")
    assert row.found.startswith("not found: checked against the defaults")
    assert "-n NAMESPACE" in row.fix
    assert "--config FILE" in row.fix


def test_an_unreadable_configmap_falls_back_with_a_warning_that_says_why() -> None:
    choice = deployed_config(Unreadable("403 Forbidden"), HOME)
    assert (choice.config, choice.source) == (InjectorConfig(), DEFAULTS)
    (row,) = choice.rows
    assert (row.id, row.verdict) == ("config-source", "warn")
    assert row.found == "cannot read it: 403 Forbidden; checked against the defaults"


def test_a_configmap_without_the_key_falls_back_with_a_warning() -> None:
    (row,) = deployed_config(configmap(None), HOME).rows
    assert (row.id, row.verdict) == ("config-source", "warn")
    assert row.found == "it has no config.yaml key: checked against the defaults"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("scheduling: [unclosed", "is not valid YAML"),
        ("scheduling:\n  ssdPolicy: sometimes\n", "scheduling.ssdPolicy"),
        ("- a list\n", "the top level must be a mapping"),
    ],
)
def test_a_config_the_injector_refuses_is_a_fail(text: str, said: str) -> None:
    choice = deployed_config(configmap(text), HOME)
    assert (choice.config, choice.source) == (InjectorConfig(), DEFAULTS)
    (row,) = choice.rows
    assert (row.id, row.verdict) == ("config-source", "FAIL")
    assert said in row.found
    assert "the injector does not start with it" in row.found


def test_with_namespace_moves_what_derives_from_it() -> None:
    moved = with_namespace(InjectorConfig(), "models")
    assert moved.webhook.namespace == "models"
    assert "models" in moved.excluded_namespaces
    assert HOME not in moved.excluded_namespaces


class FakeApi:
    """call_api by path: the objects given, 404 for the rest; the paths asked for."""

    def __init__(self, objects: dict[str, Any]) -> None:
        self.objects = objects
        self.paths: list[str] = []
        self.configuration = type("Configuration", (), {"host": "https://203.0.113.7:6443"})()

    async def call_api(self, path: str, method: str, **kwargs: Any) -> Any:
        from injector.kube import ApiException

        self.paths.append(path)
        found = self.objects.get(path)
        if isinstance(found, int):
            raise ApiException(status=found, reason="Forbidden")
        if found is None:
            raise ApiException(status=404, reason="Not Found")
        return json.loads(json.dumps(found))

    async def close(self) -> None:
        pass


def configmap_at(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/configmaps/{CONFIGMAP_NAME}"


async def test_the_configmap_is_read_in_the_namespace_named() -> None:
    text = yaml.safe_dump({"scheduling": {"ssdPolicy": "off"}})
    api = FakeApi({configmap_at("models"): configmap(text)})
    choice = await choose_config(ApiReader(api), None, "models")
    assert api.paths == [configmap_at("models")]
    assert choice.source == f"configmap models/{CONFIGMAP_NAME}"
    assert choice.config.scheduling.ssd_policy == "off"
    assert choice.config.webhook.namespace == "models"  # -n wins over the config's


async def test_a_config_given_is_not_read_from_the_cluster_and_moves_with_n() -> None:
    api = FakeApi({})
    given = ConfigChoice(InjectorConfig(), "my-config.yaml")
    assert await choose_config(ApiReader(api), given, None) is given
    moved = await choose_config(ApiReader(api), given, "models")
    assert (moved.source, moved.config.webhook.namespace) == ("my-config.yaml", "models")
    assert api.paths == []


async def test_check_cluster_loads_the_context_and_checks_the_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = FakeApi({"/version": {"gitVersion": "v1.31.0", "major": "1", "minor": "31"}})
    loaded: list[tuple[str | None, str | None]] = []

    async def new_api_client(kubeconfig: str | None, context: str | None = None) -> FakeApi:
        loaded.append((kubeconfig, context))
        return api

    monkeypatch.setattr(injector.check.fetch, "new_api_client", new_api_client)
    checked = await check_cluster("admin.kubeconfig", None, context="prod-eu", namespace="models")
    assert loaded == [("admin.kubeconfig", "prod-eu")]
    assert checked.cluster == "https://203.0.113.7:6443"
    assert checked.config.source == DEFAULTS
    assert checked.config.config.webhook.namespace == "models"
    assert api.paths[0] == configmap_at("models")
    assert f"/api/v1/namespaces/{HOME}/secrets/bento-juicefs-injector-ca" not in api.paths
    assert "/api/v1/namespaces/models/secrets/bento-juicefs-injector-ca" in api.paths
    first = checked.rows[0]
    assert (first.id, first.verdict, first.subject) == (
        "config-source",
        "warn",
        f"ConfigMap models/{CONFIGMAP_NAME}",
    )


async def test_a_context_loads_the_kubeconfig_even_inside_a_pod(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kubernetes_asyncio.config

    import injector.kube

    loaded: list[dict[str, Any]] = []

    async def load_kube_config(**kwargs: Any) -> None:
        loaded.append(kwargs)

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setattr(kubernetes_asyncio.config, "load_kube_config", load_kube_config)
    api = await injector.kube.new_api_client(None, "prod-eu")
    await api.close()
    assert loaded == [{"config_file": None, "context": "prod-eu"}]
