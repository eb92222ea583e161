"""The local cluster the start-up scenarios run: real nodes whose pods reach MinIO over
shaped links, the injector and a node agent on every node.

    cluster = ShapedCluster("bench-scaleup-", work_dir=None, node_count=3)
    versions = cluster.start()        # {"juicefs": ..., "kubernetes": ...}
    cluster.storage.shape(LinkProfile(200))
    cluster.cp.kubectl(...)           # the session's own files go under cluster.work
    cluster.stop()                    # the cluster stopped, cluster.work removed

cold-start and warm-start use one node; scale-up several, each with its own
link to the store, shaped alike (`benchmarks.store.ShapedStorage`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from benchmarks.store import ShapedStorage
from devcluster.control.plane import ControlPlane
from devcluster.installs.injector_pods import start_injector, stop_injector
from devcluster.installs.node_agent import (
    AGENT_ADDON,
    LocalNodeAgent,
    start_node_agent,
    stop_node_agent,
)
from devcluster.local import local_cluster


class ShapedCluster:
    """A local cluster (not started) with the shaped storage, the injector and the agent,
    in a new temporary directory `work` (prefix, under work_dir) that stop() removes."""

    def __init__(self, prefix: str, work_dir: str | None = None, node_count: int = 1) -> None:
        self.work = Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir))
        self.cp: ControlPlane = local_cluster(
            self.work / "cluster", with_addons=False, node_count=node_count
        )
        self.shaped: ShapedStorage | None = None
        # The node agent mounts for every sidecar: without it no pod starts.
        self.cp.on_ready.extend([self._start_storage, start_injector, start_node_agent])
        self.cp.on_stop.extend([self._stop_storage, stop_injector, stop_node_agent])

    def _start_storage(self, cp: ControlPlane) -> None:
        nodes = [node.network for node in cp.nodes]
        shaped = ShapedStorage(cp.state_dir / "storage", redis_host=cp.host, nodes=nodes)
        self.shaped = shaped
        cp.addons["storage"] = shaped.stack  # the injector's credentials Secret reads it
        shaped.start()

    def _stop_storage(self, cp: ControlPlane) -> None:
        if self.shaped is not None:
            self.shaped.stop()

    @property
    def storage(self) -> ShapedStorage:
        if self.shaped is None:
            raise RuntimeError("the benchmark's cluster is not started")
        return self.shaped

    @property
    def agent(self) -> LocalNodeAgent:
        found = self.cp.addons.get(AGENT_ADDON)
        if not isinstance(found, LocalNodeAgent):
            raise RuntimeError("the benchmark's cluster runs no node agent")
        return found

    def start(self) -> dict[str, str]:
        """Start everything; the versions of JuiceFS and Kubernetes, for the record."""
        self.cp.start()
        server = json.loads(self.cp.kubectl("version", "-o", "json").stdout)["serverVersion"]
        return {
            "juicefs": self.storage.stack.juicefs.run("version").strip(),
            "kubernetes": server["gitVersion"],
        }

    def stop(self) -> None:
        try:
            self.cp.stop()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)
