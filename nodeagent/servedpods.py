"""Which pods on this node the agent serves, and where their volumes are: pure decisions.

A pod is served when its sidecar is unprivileged (it has the agent volume);
what the agent does for it (node cache or not, the Bento it seals) is read
from the sidecar's env the injector wrote, through `common.env`. A pod
whose containers have all ended, or that is deleted with none running, is
let go (`containers_ended`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import env as contract
from common.warm import BentoRef
from injector.config import InjectorConfig

EMPTY_DIR = "kubernetes.io~empty-dir"


@dataclass(frozen=True)
class PodPaths:
    """Where a pod's volumes are on the node (the kubelet's layout)."""

    volumes: Path  # <kubelet root>/pods/<uid>/volumes/kubernetes.io~empty-dir
    agent: str
    mount_dir: str
    cache: str

    @property
    def agent_dir(self) -> Path:
        return self.volumes / self.agent

    @property
    def socket(self) -> Path:
        return self.agent_dir / contract.AGENT_SOCKET_NAME

    @property
    def private_mount(self) -> Path:
        return self.agent_dir / contract.AGENT_MOUNT_NAME

    @property
    def mount_dir_path(self) -> Path:
        return self.volumes / self.mount_dir

    @property
    def cache_path(self) -> Path:
        return self.volumes / self.cache


@dataclass(frozen=True)
class ServedPod:
    """A pod on this node with an unprivileged sidecar, as the agent serves it."""

    namespace: str
    name: str
    uid: str
    # The node cache directory of its JuiceFS volume when the pod reads the
    # node cache (bound read-only), else None.
    node_cache: Path | None
    condition_type: str
    # Node mode: the Bento and models the agent seals for it (its gate is the agent's).
    bento: BentoRef | None = None
    models: tuple[str, ...] = ()
    # Its sidecar asks for the seal before it mounts (common.env.seals_before_mount).
    seals: bool = False

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def pod_paths(kubelet_root: Path, uid: str, config: InjectorConfig) -> PodPaths:
    names = config.volumes
    return PodPaths(
        volumes=kubelet_root / "pods" / uid / "volumes" / EMPTY_DIR,
        agent=names.agent_name,
        mount_dir=names.mount_dir_name,
        cache=names.cache_name,
    )


def _sidecar_env(pod: Mapping[str, Any], container_name: str) -> dict[str, str]:
    spec = pod.get("spec") or {}
    for key in ("initContainers", "containers"):
        for container in spec.get(key) or []:
            if container.get("name") == container_name:
                return {
                    str(e.get("name")): str(e.get("value"))
                    for e in container.get("env") or []
                    if isinstance(e, dict) and isinstance(e.get("value"), str)
                }
    return {}


def served_pod(pod: Mapping[str, Any], config: InjectorConfig) -> ServedPod | str:
    """The pod as the agent serves it, or why it does not (a pure reading of the pod's JSON).

    The pod is the tenant's: the volume it names is only believed when it is
    one the config knows and its namespace may use, and then only its node
    cache directory is bound.
    """
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    volumes = {v.get("name"): v for v in spec.get("volumes") or [] if isinstance(v, dict)}
    if "emptyDir" not in (volumes.get(config.volumes.agent_name) or {}):
        return "no agent volume: its sidecar mounts for itself"
    uid = str(meta.get("uid") or "")
    if not uid or "/" in uid or uid in (".", ".."):
        return "no uid"
    environment = _sidecar_env(pod, config.sidecar.container_name)
    node_cache: Path | None = None
    bento: BentoRef | None = None
    seals = False
    try:
        mode = contract.CACHE_MODE.read(environment)
        volume = contract.VOLUME.read(environment)
        if mode == "node":
            bento = BentoRef(
                volume,
                contract.BENTO_NAME.read(environment),
                contract.BENTO_VERSION.read(environment),
            )
            seals = contract.seals_before_mount(True, contract.WARMUP.read(environment))
        models = contract.MODELS.read(environment)
    except contract.EnvError as err:
        return f"its sidecar's environment: {err}"
    if mode == "node":
        if volume not in config.juicefs.allowed_volumes:
            return f"volume {volume!r} is not one of the configured JuiceFS volumes"
        # A crafted pod may name another tenant's volume: its node cache
        # holds that tenant's blocks, so it is bound only where the volume is
        # the namespace's (juicefs.volumeNamespaces), as the injector decides.
        namespace = str(meta.get("namespace") or "")
        if volume not in config.namespace_volumes(namespace):
            return f"volume {volume!r} is not one of namespace {namespace!r}'s volumes"
        if config.node_cache_path is None:
            return "node cache mode, but the config names no node cache directory"
        node_cache = Path(config.node_cache_path) / volume
    return ServedPod(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        uid=uid,
        node_cache=node_cache,
        condition_type=config.readiness.condition_type,
        bento=bento,
        models=models,
        seals=seals,
    )


def seal_ahead(pod: Mapping[str, Any], served: ServedPod) -> bool:
    """Whether the agent starts served's seal the moment it sees the pod, before the sidecar
    asks: its sidecar will ask, and the pod still waits for it (Pending, its gate not True,
    not being deleted).

    A cold node's warm then runs while the kubelet makes the pod's sandbox
    and starts its sidecar, instead of after; the sidecar's request finds
    it under way or done. An agent restarted under running pods seals none
    of them again.
    """
    if not served.seals or served.bento is None:
        return False
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if status.get("phase", "Pending") != "Pending":
        return False
    return not any(
        isinstance(c, dict) and c.get("type") == served.condition_type and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def containers_ended(pod: Mapping[str, Any]) -> bool:
    """Whether the pod will run nothing more: terminal, or deleted with no container running.

    A deleted pod's kubelet starts no container any more, so one still
    waiting (an app behind a sidecar whose mount never came up) never runs:
    once the rest have terminated, the mounts can go, and must, or the
    kubelet cannot tear the pod's volumes down.
    """
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return True
    if not (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    statuses = [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]
    return bool(statuses) and not any("running" in (s.get("state") or {}) for s in statuses)


def sealed_message(bento: str, seconds: float, copy_served: bool) -> str:
    """The ModelsSealed condition's message: what the node holds of the pod's Bento, and
    what its app reads (the copy on the node's disk, or the node cache through FUSE)."""
    held = (
        "its verified copy on the node's disk" if copy_served else "every block in the node cache"
    )
    read = "; the app reads that copy, not FUSE" if copy_served else ""
    return (
        f"{bento}: verified once on this node by the node agent, {held} "
        f"(checked in {seconds:.1f}s){read}"
    )
