from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from injector.cli import main
from injector.config import ConfigError, InjectorConfig, load_config, parse_config


def test_defaults_are_the_gke_profile() -> None:
    config = InjectorConfig()
    assert config.cluster.platform_profile == "gke"
    assert config.cluster.native_sidecars is True
    label = config.ssd_node_label
    assert label is not None
    assert label.key == "cloud.google.com/gke-ephemeral-storage-local-ssd"
    assert "kube-system" in config.excluded_namespaces
    assert config.webhook.namespace in config.excluded_namespaces


def test_camel_case_keys_round_trip() -> None:
    config = parse_config({"cluster": {"kubernetesVersion": "1.28.3", "platformProfile": "eks"}})
    assert config.cluster.native_sidecars is False
    dumped = yaml.safe_load(config.to_yaml())
    assert dumped["cluster"]["kubernetesVersion"] == "1.28.3"
    assert parse_config(dumped) == config


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"sidecar": {"imagee": "x"}}, "sidecar.imagee: unknown key"),
        ({"cluster": {"kubernetesVersion": "latest"}}, "cluster.kubernetesVersion"),
        (
            {"cluster": {"platformProfile": "openshift"}},
            "platformProfile 'openshift' is not one of",
        ),
        ({"juicefs": {"defaultCacheSize": "big"}}, "juicefs.defaultCacheSize"),
        ({"juicefs": {"defaultVolume": "other"}}, "must be one of juicefs.allowedVolumes"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"sidecar": {"imagePullSecrets": ["Registry"]}}, "sidecar.imagePullSecrets.0"),
        ({"sidecar": {"imagePullSecrets": ["a/b"]}}, "sidecar.imagePullSecrets.0"),
        ({"sidecar": {"imagePullSecrets": ["ok", "x" * 254]}}, "sidecar.imagePullSecrets.1"),
        ({"sidecar": {"imagePullSecrets": "registry"}}, "sidecar.imagePullSecrets"),
        (["a", "list"], "top level must be a mapping"),
    ],
)
def test_bad_config_names_the_key(data: object, expected: str) -> None:
    with pytest.raises(ConfigError, match="invalid config") as info:
        parse_config(data)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"sidecar": {"unprivileged": True}}, "sidecar.unprivileged"),
        ({"sidecar": {"unprivileged": False}}, "sidecar.unprivileged"),
        ({"podSecurity": {"defaultEnforce": "baseline"}}, "podSecurity"),
        ({"podSecurity": None}, "podSecurity"),
        ({"pod_security": {}}, "pod_security"),
        ({"controller": {"roleName": "bento-juicefs-models-ready"}}, "controller.roleName"),
        ({"volumes": {"tokenName": "juicefs-sa-token"}}, "volumes.tokenName"),
        ({"volumes": {"token_name": "t"}}, "volumes.token_name"),
        ({"webhook": {"timeoutSeconds": 5}}, "webhook.timeoutSeconds"),
        ({"webhook": {"timeout_seconds": 10}}, "webhook.timeout_seconds"),
    ],
)
def test_a_removed_key_fails_saying_it_was_removed_and_why(data: object, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    message = str(info.value)
    (line,) = [line.strip() for line in message.splitlines() if key in line]
    assert line.startswith(f"{key} was removed: ")
    assert line.endswith("; delete the key")
    assert "unknown key" not in message


def test_the_removed_sidecar_flag_says_the_sidecar_is_always_unprivileged() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"sidecar": {"unprivileged": True, "image": "x"}})
    assert str(info.value) == (
        "invalid config <inline>:\n"
        "  sidecar.unprivileged was removed: the sidecar is always unprivileged and the node "
        "agent mounts for it; delete the key"
    )


def test_every_removed_key_is_named_at_once() -> None:
    data = {
        "sidecar": {"unprivileged": True},
        "podSecurity": {},
        "controller": {"roleName": "x"},
        "volumes": {"tokenName": "y"},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    lines = str(info.value).splitlines()[1:]
    assert [line.split(" was removed")[0].strip() for line in lines] == [
        "sidecar.unprivileged",
        "podSecurity",
        "controller.roleName",
        "volumes.tokenName",
    ]


def test_a_removed_key_in_a_file_fails_the_cli_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "config.yaml"
    old.write_text("sidecar:\n  unprivileged: true\n")
    assert main(["config", "--config", str(old)]) == 2
    err = capsys.readouterr().err
    assert f"invalid config {old}:" in err
    assert "sidecar.unprivileged was removed: the sidecar is always unprivileged" in err
    assert "Traceback" not in err


def test_the_effective_config_has_no_removed_key() -> None:
    dumped = yaml.safe_load(InjectorConfig().to_yaml())
    assert "podSecurity" not in dumped
    assert "unprivileged" not in dumped["sidecar"]
    assert "roleName" not in dumped["controller"]
    assert "tokenName" not in dumped["volumes"]
    assert "timeoutSeconds" not in dumped["webhook"]
    assert dumped["volumes"]["agentName"] == "juicefs-agent"


def test_bad_config_file_fails_cli_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("warmup:\n  concurrency: 0\n")
    assert main(["config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "warmup.concurrency" in err
    assert "Traceback" not in err
    bad.write_text("warmup: [\n")
    assert main(["config", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["config", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config" in capsys.readouterr().err


def test_config_command_prints_effective_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "config.yaml"
    file.write_text("juicefs:\n  defaultCacheSize: 50Gi\n")
    assert main(["config", "--config", str(file)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["juicefs"]["defaultCacheSize"] == "50Gi"
    assert printed["labels"]["modelStore"] == "juicefs.bentoml.com/model-store"
    assert load_config(file).juicefs.default_cache_size == "50Gi"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"cache": {"mode": "shared"}}, "cache.mode"),
        ({"cache": {"nodePath": "mnt/ssd"}}, "must be an absolute, normalized directory"),
        ({"cache": {"nodePath": "/mnt/ssd/../etc"}}, "must be an absolute, normalized directory"),
        ({"cache": {"nodePath": "/"}}, "must be an absolute, normalized directory"),
        ({"cache": {"nodeBudget": "512Mi"}}, "cache.nodeBudget must be a whole number of bytes"),
        ({"cache": {"nodeScanSeconds": 0}}, "cache.nodeScanSeconds"),
        (
            {"cluster": {"platformProfile": "none"}, "scheduling": {"ssdPolicy": "off"},
             "cache": {"mode": "node"}},
            "set cache.nodePath or cache.mode: pod",
        ),
        ({"volumes": {"cacheMedium": "Memory"}}, "volumes.cacheMedium Memory is for the pod cache"),
        (
            {"juicefs": {"allowedVolumes": ["models", "../etc"]}},
            "'../etc' is not a JuiceFS volume name",
        ),
    ],
)  # fmt: skip
def test_bad_cache_config_names_the_key(data: object, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_config(data)


def test_cache_mode_defaults_follow_the_profile() -> None:
    assert InjectorConfig().cache_mode == "node"
    assert InjectorConfig().node_cache_path == (
        "/mnt/stateful_partition/kube-ephemeral-ssd/bento-juicefs"
    )
    none = parse_config(
        {"cluster": {"platformProfile": "none"}, "scheduling": {"ssdPolicy": "off"}}
    )
    assert none.cache_mode == "pod"
    assert none.node_cache_path is None
    pinned = parse_config({"cache": {"mode": "pod"}, "volumes": {"cacheMedium": "Memory"}})
    assert pinned.cache_mode == "pod"


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        (70000, "expected a TCP port from 1 to 65535, or 0 for no metrics endpoint"),
        (-1, "expected a TCP port from 1 to 65535, or 0 for no metrics endpoint"),
        # Strict: YAML's true is not port 1, nor a quoted number a port.
        (True, "Input should be a valid integer"),
        ("9465", "Input should be a valid integer"),
    ],
)
def test_a_bad_sidecar_metrics_port_names_the_key_and_the_accepted_form(
    port: object, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"sidecar": {"metricsPort": port}})
    assert f"sidecar.metricsPort: {expected}" in str(info.value).replace("Value error, ", "")


def test_sidecar_image_pull_secrets_are_secret_names() -> None:
    assert InjectorConfig().sidecar.image_pull_secrets == ()
    names = ["registry", "corp.registry-1"]
    config = parse_config({"sidecar": {"imagePullSecrets": names}})
    assert config.sidecar.image_pull_secrets == tuple(names)


@pytest.mark.parametrize("port", [0, 1, 9465, 65535])
def test_sidecar_metrics_port(port: int) -> None:
    assert InjectorConfig().sidecar.metrics_port == 9465
    assert parse_config({"sidecar": {"metricsPort": port}}).sidecar.metrics_port == port


# --- volumes per namespace ------------------------------------------------------------------


def _tenants(volume_namespaces: dict[str, list[str]], default: str = "models") -> InjectorConfig:
    return InjectorConfig.model_validate(
        {
            "juicefs": {
                "defaultVolume": default,
                "allowedVolumes": ["models", "team-a", "team-b"],
                "volumeNamespaces": volume_namespaces,
            }
        }
    )


def test_a_volume_bound_to_namespaces_is_theirs_alone() -> None:
    config = _tenants({"team-a": ["team-a"], "models": ["*"]})
    assert config.namespace_volumes("team-a") == ("models", "team-a", "team-b")
    assert config.namespace_volumes("team-c") == ("models", "team-b")


def test_the_default_volume_is_the_namespace_s_only_one_when_the_global_is_not_its() -> None:
    config = _tenants({"models": ["ops"], "team-a": ["team-a"], "team-b": ["team-b", "ops"]})
    assert config.namespace_default_volume("ops") == "models"
    assert config.namespace_default_volume("team-a") == "team-a"
    assert config.namespace_default_volume("nobody") is None
    both = _tenants({"models": ["ops"], "team-a": ["x"], "team-b": ["x"]})
    assert both.namespace_default_volume("x") is None


@pytest.mark.parametrize(
    ("volume_namespaces", "message"),
    [
        ({"team-z": ["a"]}, "'team-z' is not one of juicefs.allowedVolumes"),
        ({"team-a": ["Team_A"]}, "'Team_A' is not a namespace name"),
        ({"team-a": ["team-*"]}, "'team-*' is not a namespace name"),
    ],
)
def test_volume_namespaces_name_known_volumes_and_real_namespaces(
    volume_namespaces: dict[str, list[str]], message: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        _tenants(volume_namespaces)
