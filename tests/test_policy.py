"""The sidecar-required policy and the injector agree on what an injected pod has.

The ValidatingAdmissionPolicy in manifests/base cannot read the injector's
config, so it spells out the default names; it admits only emptyDirs under
our volume names and requires the agent volume. The e2e suite runs the
policy itself on a real apiserver (tests/e2e/test_admission.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from injector.config import InjectorConfig
from injector.mutation.owned import owned_names
from tests.helpers import GOLDEN_CASES, injected_pods

POLICY = Path(__file__).resolve().parent.parent / "manifests/base/policy-sidecar-required.yaml"


def policy_spec() -> dict[str, Any]:
    documents = yaml.safe_load_all(POLICY.read_text())
    spec: dict[str, Any] = next(d for d in documents if d["kind"].endswith("Policy"))["spec"]
    return spec


def policy_variable(name: str) -> str:
    variables: list[dict[str, Any]] = policy_spec()["variables"]
    return str(next(v["expression"] for v in variables if v["name"] == name)).strip()


def validation(message_start: str) -> str:
    """The expression of the validation whose message starts so, on one line."""
    for item in policy_spec()["validations"]:
        if " ".join(item["message"].split()).startswith(message_start):
            return " ".join(str(item["expression"]).split())
    raise AssertionError(f"no validation says {message_start!r}")


def test_the_policy_names_our_volumes_and_sidecar() -> None:
    config = InjectorConfig()
    assert policy_variable("cacheVolume") == f"'{config.volumes.cache_name}'"
    assert policy_variable("agentVolume") == f"'{config.volumes.agent_name}'"
    assert policy_variable("sidecar") == f"'{config.sidecar.container_name}'"
    expression = validation("volumes juicefs-mount-dir, juicefs-cache and juicefs-agent")
    assert f"'{config.volumes.mount_dir_name}'" in expression


def test_our_three_volumes_must_be_empty_dirs_at_creation() -> None:
    assert validation("volumes juicefs-mount-dir, juicefs-cache and juicefs-agent") == (
        "!variables.creating || variables.volumes.all(v, !(v.name in ['juicefs-mount-dir', "
        "variables.cacheVolume, variables.agentVolume]) || has(v.emptyDir))"
    )


def test_an_injected_pod_must_keep_the_agent_volume() -> None:
    assert validation("this pod has the juicefs-mount sidecar but no juicefs-agent volume") == (
        "!variables.creating || size(variables.native) + size(variables.classic) == 0 || "
        "variables.volumes.exists(v, v.name == variables.agentVolume)"
    )


def test_no_validation_admits_a_host_path() -> None:
    for item in policy_spec()["validations"]:
        assert "hostPath" not in item["expression"]


def test_every_golden_pod_has_our_volumes_as_the_policy_wants_them() -> None:
    ours = set(owned_names(InjectorConfig()).volumes)
    seen = 0
    for case in GOLDEN_CASES:
        for _, pod in injected_pods(case):
            volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
            assert ours <= set(volumes), case.name
            for name in ours:
                assert set(volumes[name]) == {"name", "emptyDir"}, (case.name, name)
            seen += 1
    assert seen >= 20
