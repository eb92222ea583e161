"""Extra things to start with the local cluster: edit the two lists below.

Each hook is a callable taking the running `ControlPlane`. `ON_READY` hooks run
in order once the control plane is ready (in `python -m devcluster up` and in
the e2e `cluster` fixture); `ON_STOP` hooks run in reverse order before the
components are stopped. A hook that raises during start-up aborts it (the
control plane is stopped and the error reported). A hook may keep state on the
instance, e.g. `cp.addons["webhook"] = process`, for its ON_STOP partner.

Example::

    def start_minio(cp: ControlPlane) -> None:
        ...  # spawn minio, log to cp.log_path("minio"), wait until it answers

    ON_READY.append(start_minio)
"""

from __future__ import annotations

from devcluster.control.plane import ControlPlane, Hook
from devcluster.installs.injector_pods import start_injector, stop_injector
from devcluster.installs.node_agent import start_node_agent, stop_node_agent
from devcluster.storage.stack import StorageStack


def start_storage(cp: ControlPlane) -> None:
    """MinIO + Redis + a JuiceFS volume, listening where the node's pods reach the host."""
    storage = StorageStack(cp.state_dir / "storage", host=cp.host)
    cp.addons["storage"] = storage
    storage.start()
    cp.log(f"storage ready: {storage.describe()}")


def stop_storage(cp: ControlPlane) -> None:
    storage = cp.addons.get("storage")
    if isinstance(storage, StorageStack):
        storage.stop()


# The node agent mounts for every injected sidecar: it comes right after the injector.
ON_READY: list[Hook] = [start_storage, start_injector, start_node_agent]
ON_STOP: list[Hook] = [stop_storage, stop_injector, stop_node_agent]
