"""Volumes per namespace on the real cluster: a namespace gets only its volumes.

The injector runs with two volumes, `models` (shared by every opted-in
namespace) and `team-b` (bound to one namespace by
`juicefs.volumeNamespaces`), as an administrator would configure it: the
team-b credentials Secret in the injector's namespace, and its name added to
the injector's ClusterRole (the chart does that from `config.juicefs.
allowedVolumes`). Then: team-b's namespace receives both Secrets, any other
opted-in namespace only `models`'; a pod there that names team-b is denied
with a message naming the namespace's volumes, and one in team-b's namespace
is injected with team-b's Secret. That tenant A's credentials read nothing of
tenant B's blocks or metadata is tests/storage/test_tenant_volumes.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

from devcluster import Cluster, wait_for
from devcluster.installs.injector_install import InjectorInstall
from tests.e2e.pods import OPT_IN, bento_pod, kubectl_create

SYSTEM = "bento-juicefs-system"
CLUSTER_ROLE = "bento-juicefs-injector"
MODELS = "juicefs-models-credentials"
TEAM_B = "juicefs-team-b-credentials"
VOLUME = "juicefs.bentoml.com/volume"


def _secret_rule(cluster: Cluster) -> tuple[int, list[str]]:
    rules = cluster.get_json("clusterrole", CLUSTER_ROLE)["rules"]
    for index, rule in enumerate(rules):
        if rule.get("resources") == ["secrets"]:
            return index, list(rule["resourceNames"])
    raise AssertionError(f"ClusterRole {CLUSTER_ROLE} has no rule for Secrets: {rules}")


@pytest.fixture
def team_b_volume(cluster: Cluster, injector: InjectorInstall) -> Iterator[str]:
    """team-b configured as an administrator would; its namespace's name. Undone after."""
    namespace = f"e2e-team-b-{uuid.uuid4().hex[:6]}"
    source = cluster.get_json("secret", MODELS, "-n", SYSTEM)
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": TEAM_B, "namespace": SYSTEM},
            "data": source["data"],
        }
    )
    index, names = _secret_rule(cluster)
    widened = [{"op": "add", "path": f"/rules/{index}/resourceNames/-", "value": TEAM_B}]
    cluster.kubectl("patch", "clusterrole", CLUSTER_ROLE, "--type=json", "-p", json.dumps(widened))
    changes = {
        "juicefs": {
            "allowedVolumes": ["models", "team-b"],
            "volumeNamespaces": {"team-b": [namespace]},
        }
    }
    try:
        with injector.reconfigured(changes):
            yield namespace
    finally:
        restore = [{"op": "replace", "path": f"/rules/{index}/resourceNames", "value": names}]
        cluster.kubectl(
            "patch", "clusterrole", CLUSTER_ROLE, "--type=json", "-p", json.dumps(restore)
        )
        cluster.kubectl("delete", "secret", TEAM_B, "-n", SYSTEM, check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _copies(cluster: Cluster, namespace: str) -> set[str]:
    items = cluster.get_json(
        "secret", "-n", namespace, "-l", "app.kubernetes.io/managed-by=bento-juicefs-injector"
    )["items"]
    return {item["metadata"]["name"] for item in items}


def test_a_namespace_receives_only_its_volumes_and_may_name_no_other(
    cluster: Cluster, team_b_volume: str
) -> None:
    other = f"e2e-tenant-{uuid.uuid4().hex[:6]}"
    cluster.create_namespace(team_b_volume, OPT_IN)
    cluster.create_namespace(other, OPT_IN)
    try:
        wait_for(
            lambda: _copies(cluster, team_b_volume) == {MODELS, TEAM_B},
            timeout=60,
            what=f"both volumes' credentials in {team_b_volume}",
        )
        wait_for(
            lambda: _copies(cluster, other) == {MODELS},
            timeout=60,
            what=f"the shared volume's credentials in {other}",
        )

        denied = kubectl_create(
            cluster, other, bento_pod("theirs", **{VOLUME: "team-b"}), "--dry-run=server"
        )
        assert denied.returncode != 0
        assert f"names a volume namespace '{other}' may not use" in denied.stderr
        assert "expected one of models" in denied.stderr

        own = kubectl_create(
            cluster,
            team_b_volume,
            bento_pod("ours", **{VOLUME: "team-b"}),
            "--dry-run=server",
            "-o",
            "json",
        )
        assert own.returncode == 0, own.stderr
        assert TEAM_B in own.stdout
        assert _copies(cluster, other) == {MODELS}  # still: nothing of team-b ever landed
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)
