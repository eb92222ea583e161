"""The node agent's budget on the real node: three Bentos that together exceed it.

The agent starts, with the smallest node budget the config allows (1Gi, of
which JuiceFS keeps 0.9: 921 MiB), where three Bento Deployments of 320 MiB
each exist (0 replicas: nothing but the agent reads them). The two newest are held
and labelled, the oldest is recorded over budget; when the newest one's
Deployment goes, its Bento is evicted to make room and the oldest is warmed.
The agent's Bentos' blocks in the node cache, counted block by block from
the files' object keys, never exceed the budget.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from common.warm import WARM_ANNOTATION, NodeWarmth, warm_label_key
from devcluster import Cluster, wait_for
from devcluster.installs.node_agent import LocalNodeAgent
from devcluster.node.host import node_cache_dir
from devcluster.node.node import Node
from devcluster.storage.juicefs import cached_blocks
from devcluster.storage.stack import MIB, StorageStack
from modelstore.manifest import Manifest
from tests.e2e.pods import bento_labels, checking_deployment, opted_in_namespace

BENTOS = ("budget-a", "budget-b", "budget-c")  # oldest first
VERSION = "v1"
SHARDS = [80 * MIB] * 4
BUDGET = 921 * MIB  # int(1Gi x 0.9) in whole MiB, JuiceFS's limit


@pytest.fixture(scope="module")
def models(storage: StorageStack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Manifest]:
    scratch = tmp_path_factory.mktemp("budget")
    return {name: storage.publish_random(scratch, name, VERSION, SHARDS) for name in BENTOS}


@pytest.fixture(scope="module")
def agent(node_agent: LocalNodeAgent) -> Iterator[LocalNodeAgent]:
    yield node_agent  # installed with prewarm by the test, once its workloads exist
    print(node_agent.logs()[-3000:])
    node_agent.restore()


@pytest.fixture(scope="module")
def namespace(cluster: Cluster, node: Node) -> Iterator[str]:
    with opted_in_namespace(cluster, "e2e-budget") as name:
        yield name


def states(cluster: Cluster, node: Node) -> dict[str, str]:
    annotations = cluster.get_json("node", node.name)["metadata"].get("annotations") or {}
    records = NodeWarmth.parse(annotations.get(WARM_ANNOTATION)).records
    return {ref.name: r.state for ref, r in records.items() if ref.name in BENTOS}


def wait_states(
    cluster: Cluster, node: Node, agent: LocalNodeAgent, expected: dict[str, str]
) -> None:
    try:
        wait_for(lambda: states(cluster, node) == expected, timeout=180, interval=0.5,
                 what=f"the agent's record to be {expected}")  # fmt: skip
    except TimeoutError:
        raise AssertionError(
            f"record {states(cluster, node)}, expected {expected}:\n{agent.logs()}"
        ) from None


def held(storage: StorageStack, node: Node, models: dict[str, Manifest]) -> dict[str, int]:
    """Bytes of each Bento's blocks in the node cache, found by their object keys."""
    blocks = cached_blocks(node_cache_dir(node.dir) / "models")
    found = {}
    for name, manifest in models.items():
        directory = storage.bento_dir(name, VERSION) / "models"
        keys = {
            key.rsplit("/", 1)[1]
            for f in manifest.files
            for key in storage.juicefs.object_keys(directory / f.path)
        }
        found[name] = sum(size for block, size in blocks.items() if block in keys)
    return found


def test_three_bentos_over_the_budget_the_newest_two_are_held_and_an_unused_one_makes_room(
    cluster: Cluster,
    node: Node,
    storage: StorageStack,
    agent: LocalNodeAgent,
    namespace: str,
    models: dict[str, Manifest],
) -> None:
    size = models["budget-a"].total_bytes
    assert 2 * size <= BUDGET < 3 * size
    for name in BENTOS:  # oldest first: each apply a newer change (whole seconds apart)
        manifest = checking_deployment(name, bento_labels(name, VERSION), models[name], 0)
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
        time.sleep(1.1)
    # The agent starts as on a node that joins a cluster where the three exist:
    # it warms the newest first. (One that is warm and in use is never evicted
    # for a newer one: the newcomer is over budget until room is free.)
    # Blocks only: with its local copy each Bento counts twice (footprint,
    # tests/storage/test_node_agent_cache.py), and two of 640 MiB would not fit.
    agent.install(prewarm=True, cache={"nodeBudget": "1Gi", "localCopy": False})

    wait_states(cluster, node, agent, {"budget-c": "warm", "budget-b": "warm",
                                       "budget-a": "over-budget"})  # fmt: skip
    by_bento = held(storage, node, models)
    print(f"\nbudget {BUDGET / MIB:.0f} MiB, three {size / MIB:.0f} MiB Bentos: held "
          f"{ {k: round(v / MIB) for k, v in by_bento.items()} } MiB")  # fmt: skip
    assert sum(by_bento.values()) <= BUDGET
    assert by_bento["budget-a"] == 0
    labels = cluster.get_json("node", node.name)["metadata"].get("labels") or {}
    assert warm_label_key("budget-c", VERSION) in labels
    assert warm_label_key("budget-b", VERSION) in labels
    assert warm_label_key("budget-a", VERSION) not in labels
    over = cluster.kubectl(
        "get", "events", "-n", "default", "--field-selector", "reason=ModelOverBudget", "-o",
        "json",
    )  # fmt: skip
    assert any("budget-a" in e["message"] for e in json.loads(over.stdout)["items"])

    # budget-c's workload goes: it is the one no workload uses, so it makes room for budget-a.
    cluster.kubectl("delete", "deployment", "budget-c", "-n", namespace)
    wait_states(cluster, node, agent, {"budget-c": "evicted", "budget-b": "warm",
                                       "budget-a": "warm"})  # fmt: skip
    by_bento = held(storage, node, models)
    print(f"after budget-c's Deployment went: held "
          f"{ {k: round(v / MIB) for k, v in by_bento.items()} } MiB")  # fmt: skip
    assert sum(by_bento.values()) <= BUDGET
    assert by_bento["budget-c"] == 0
    assert by_bento["budget-a"] >= size
    labels = cluster.get_json("node", node.name)["metadata"].get("labels") or {}
    assert warm_label_key("budget-c", VERSION) not in labels
    assert warm_label_key("budget-a", VERSION) in labels
