"""e2e fixtures: a real cluster, local (devcluster) or given by $E2E_KUBECONFIG.

Every test under tests/e2e is marked `e2e`; deselect them with `-m "not e2e"`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster import Cluster, ControlPlane, ensure_binaries
from devcluster.injector import InjectorInstall, LocalInjector
from devcluster.injector_pods import PodInjector
from devcluster.local import local_cluster
from devcluster.node import Node
from devcluster.nodeagent import AGENT_ADDON, LocalNodeAgent
from devcluster.storage import StorageStack
from modelstore.manifest import Manifest

E2E_DIR = Path(__file__).resolve().parent
EXTERNAL_KUBECONFIG = os.environ.get("E2E_KUBECONFIG") or None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(E2E_DIR):
            item.add_marker(pytest.mark.e2e)


def _external_kubectl() -> str:
    return shutil.which("kubectl") or str(ensure_binaries(["kubectl"])["kubectl"])


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The cluster under test: `.kubeconfig`, `.kubectl(...)`, `.register_fake_node(...)`.

    With $E2E_KUBECONFIG set (e.g. a kind cluster) that cluster is used as is;
    otherwise the local cluster runs for the whole session: the control plane,
    a real node (containerd + kubelet) with the project's images, and the
    `devcluster.addons` (storage, the injector).
    """
    if EXTERNAL_KUBECONFIG:
        yield Cluster(Path(EXTERNAL_KUBECONFIG), _external_kubectl())
        return
    cp = local_cluster(tmp_path_factory.mktemp("cluster"))
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def node(cluster: Cluster) -> Node:
    """The local cluster's real node (containerd + kubelet)."""
    found = cluster.node if isinstance(cluster, ControlPlane) else None
    if not isinstance(found, Node):
        pytest.skip("needs the local node (E2E_KUBECONFIG is set)")
    return found


@pytest.fixture(scope="session")
def storage(cluster: Cluster) -> StorageStack:
    """The local cluster's JuiceFS volume (MinIO + Redis), whose credentials pods get."""
    found = cluster.addons.get("storage") if isinstance(cluster, ControlPlane) else None
    if not isinstance(found, StorageStack):
        pytest.skip("needs the local cluster's storage (E2E_KUBECONFIG is set)")
    return found


EXAMPLE_BENTO = ("llama3-8b-instruct", "4fd7wxrbkcxfylg5")  # examples/bento-deployment.yaml


@pytest.fixture(scope="session")
def example_model(storage: StorageStack, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """The example Bento's models, published once (a Bento version is immutable)."""
    name, version = EXAMPLE_BENTO
    return storage.publish_random(
        tmp_path_factory.mktemp("example-model"), name, version, [48 << 20] * 4
    )


@pytest.fixture(scope="session")
def injector(cluster: Cluster) -> InjectorInstall:
    """The local cluster's injector: pods from Helm or kustomize, or a local process
    ($BENTO_INJECTOR_INSTALL, devcluster/injector_pods.py); tests stop, start and
    reconfigure it through this."""
    found = cluster.addons.get("injector") if isinstance(cluster, ControlPlane) else None
    if not isinstance(found, LocalInjector | PodInjector):
        pytest.skip("needs the local cluster's injector (E2E_KUBECONFIG is set)")
    return found


@pytest.fixture
def local_only() -> None:
    if EXTERNAL_KUBECONFIG:
        pytest.skip("needs the local control plane (E2E_KUBECONFIG is set)")


@pytest.fixture(scope="session")
def node_agent(cluster: Cluster, node: Node) -> LocalNodeAgent:
    """The node agent the local cluster runs (devcluster.nodeagent, without prewarm):
    it mounts for every injected sidecar. Tests that install it otherwise restore it."""
    found = cluster.addons.get(AGENT_ADDON) if isinstance(cluster, ControlPlane) else None
    if not isinstance(found, LocalNodeAgent):
        pytest.skip("needs the local cluster's node agent (E2E_KUBECONFIG is set)")
    return found


@pytest.fixture(autouse=True)
def _node_agent_runs(request: pytest.FixtureRequest) -> None:
    """Every test with pods on the local node starts with the default agent running:
    one test that deleted or replaced it must not fail the next ones."""
    if "node" in request.fixturenames and not EXTERNAL_KUBECONFIG:
        agent = request.getfixturevalue("node_agent")
        assert isinstance(agent, LocalNodeAgent)
        agent.ensure_running()
