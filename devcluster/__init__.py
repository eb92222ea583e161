"""A local Kubernetes control plane from upstream binaries, for e2e tests and demos.

    from devcluster import ControlPlane
    with ControlPlane(Path("/tmp/cp")) as cp:
        cp.kubectl("get", "ns")

CLI: `python -m devcluster up|down|status [--state-dir DIR]`.
"""

from devcluster.binaries import BinariesError, ensure_binaries
from devcluster.cluster import Cluster, wait_for
from devcluster.control.plane import ComponentError, ControlPlane, Hook, Ports

__all__ = [
    "BinariesError",
    "Cluster",
    "ComponentError",
    "ControlPlane",
    "Hook",
    "Ports",
    "ensure_binaries",
    "wait_for",
]
