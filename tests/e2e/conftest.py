"""e2e fixtures: a real cluster, local (devcluster) or given by $E2E_KUBECONFIG.

Every test under tests/e2e is marked `e2e`; deselect them with `-m "not e2e"`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster import Cluster, ControlPlane, addons, ensure_binaries

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
    otherwise a local control plane (with the `devcluster.addons` hooks) runs
    for the whole session.
    """
    if EXTERNAL_KUBECONFIG:
        yield Cluster(Path(EXTERNAL_KUBECONFIG), _external_kubectl())
        return
    cp = ControlPlane(
        tmp_path_factory.mktemp("controlplane"),
        on_ready=addons.ON_READY,
        on_stop=addons.ON_STOP,
    )
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def local_only() -> None:
    if EXTERNAL_KUBECONFIG:
        pytest.skip("needs the local control plane (E2E_KUBECONFIG is set)")
