"""The local cluster as `make cluster-up`, the e2e suite and `make demo` start it.

One place wires the parts together: the control plane, a real node shaped
like a GKE local-SSD GPU pool node with the project's images imported, and
the add-ons (storage, then the injector) from `devcluster.addons`.
"""

from __future__ import annotations

from pathlib import Path

from devcluster import addons
from devcluster.control.plane import ControlPlane
from devcluster.images import ensure_images, import_images
from devcluster.node.netns import NodeNetwork
from devcluster.node.node import NodeSpec


def import_node_images(ctr: Path, socket: Path) -> None:
    """Build (or reuse) the project's images and import them into the node's containerd."""
    import_images(ctr, str(socket), ensure_images())


def local_cluster(
    state_dir: Path,
    *,
    node: NodeSpec | None = None,
    with_addons: bool = True,
    die_with_parent: bool = True,
    node_count: int = 1,
) -> ControlPlane:
    """A ControlPlane (not started) with `node_count` real nodes of one pool and, by
    default, the add-ons."""
    return ControlPlane(
        state_dir,
        node=node or NodeSpec(),
        # Another local cluster (a test's, a demo's) may be running: its own network.
        network=NodeNetwork.first_free(),
        import_images=import_node_images,
        on_ready=addons.ON_READY if with_addons else (),
        on_stop=addons.ON_STOP if with_addons else (),
        # False to leave it running after this process exits (`make demo --keep`).
        die_with_parent=die_with_parent,
        node_count=node_count,
    )
