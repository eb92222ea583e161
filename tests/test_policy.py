"""The sidecar-required policy's node cache pattern and the injector's profiles agree.

The ValidatingAdmissionPolicy in manifests/base cannot read the injector's
config, so it spells out the default profiles' node cache directories; the
e2e suite runs the policy itself on a real apiserver (tests/e2e/test_node_cache.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from devcluster.injector import node_cache_pattern_patch
from injector.config import InjectorConfig
from tests.helpers import GOLDEN_CASES, injected_pods

POLICY = Path(__file__).resolve().parent.parent / "manifests/base/policy-sidecar-required.yaml"


def policy_variable(name: str) -> str:
    policy = next(d for d in yaml.safe_load_all(POLICY.read_text()) if d["kind"].endswith("Policy"))
    variables: list[dict[str, Any]] = policy["spec"]["variables"]
    return str(next(v["expression"] for v in variables if v["name"] == name)).strip()


def node_cache_pattern() -> re.Pattern[str]:
    literal = policy_variable("nodeCacheDir")
    assert literal.startswith("'")
    assert literal.endswith("'")
    return re.compile(literal[1:-1])


@pytest.mark.parametrize("profile", ["gke", "eks", "aks"])
def test_every_profiles_node_cache_directory_passes_the_policy(profile: str) -> None:
    path = InjectorConfig().cluster.profiles[profile].node_cache_path
    assert path is not None
    for volume in ("models", "vision-models", "m.v2"):
        assert node_cache_pattern().match(f"{path}/{volume}"), (profile, volume)


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/etc",
        "/var/lib/kubelet",
        "/mnt/bento-juicefs",
        "/mnt/bento-juicefs/",
        "/mnt/bento-juicefs/..",
        "/mnt/bento-juicefs/models/..",
        "/mnt/bento-juicefs/models/../../etc",
        "/mnt/bento-juicefs/-models",
        "/mnt/stateful_partition/bento-juicefs/models",
        "/mnt/k8s-disks/1/bento-juicefs/models",
        "/tmp/mnt/bento-juicefs/models",
    ],
)
def test_other_host_paths_fail_the_policy(path: str) -> None:
    assert not node_cache_pattern().match(path)


def test_every_golden_node_cache_passes_the_policy() -> None:
    seen = 0
    for case in GOLDEN_CASES:
        for _, pod in injected_pods(case):
            for volume in pod["spec"].get("volumes") or []:
                if volume["name"] == "juicefs-cache" and "hostPath" in volume:
                    seen += 1
                    assert node_cache_pattern().match(volume["hostPath"]["path"]), case.name
    assert seen >= 20


def test_the_policy_names_our_cache_volume_and_sidecar() -> None:
    config = InjectorConfig()
    assert policy_variable("cacheVolume") == f"'{config.volumes.cache_name}'"
    assert policy_variable("sidecar") == f"'{config.sidecar.container_name}'"


def test_the_local_clusters_overlay_adds_its_node_cache_directory(tmp_path: Path) -> None:
    """devcluster does what a platform with its own cache.nodePath does to the policy."""
    local = tmp_path / "cluster.0" / "node" / "local-ssd"
    (patch,) = node_cache_pattern_patch(local)
    index = int(patch["path"].split("/")[3])
    assert policy_variable_names()[index] == "nodeCacheDir"
    pattern = re.compile(patch["value"][1:-1])
    assert pattern.match(f"{local}/models")
    assert not pattern.match(f"{tmp_path}/clusterx0/node/local-ssd/models")  # the dot is literal
    assert pattern.match("/mnt/k8s-disks/0/bento-juicefs/models")
    assert not pattern.match(f"{local}/models/../../etc")
    with pytest.raises(ValueError, match="only letters"):
        node_cache_pattern_patch(Path("/mnt/it's"))


def policy_variable_names() -> list[str]:
    policy = next(d for d in yaml.safe_load_all(POLICY.read_text()) if d["kind"].endswith("Policy"))
    return [str(v["name"]) for v in policy["spec"]["variables"]]
