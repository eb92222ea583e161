"""The sidecar's settings, read from the environment the injector wrote.

The names, defaults and value rules are the contract in `common.env`, which
the injector writes through; this module only gathers them into `Settings`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common import env as contract
from common.env import CacheMode, EnvError, SsdPolicy
from modelstore.mountspec import MountSpec

__all__ = [
    "AGENT_SOCKET",
    "CACHE_DIR",
    "JUICEFS_BIN",
    "MOUNT_POINT",
    "PRIVATE_MOUNT",
    "Settings",
    "SettingsError",
]

# Plain names for tests that run the sidecar as a host process with their
# own paths, and for the probe's default mount point.
MOUNT_POINT = contract.MOUNT_POINT.name
CACHE_DIR = contract.CACHE_DIR.name
PRIVATE_MOUNT = contract.PRIVATE_MOUNT.name
JUICEFS_BIN = contract.JUICEFS_BIN.name
AGENT_SOCKET = contract.AGENT_SOCKET.name


class SettingsError(EnvError):
    """The sidecar's environment is incomplete or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    pod_name: str
    pod_namespace: str
    pod_uid: str
    meta_url: str
    access_key: str | None
    secret_key: str | None
    bento_name: str
    bento_version: str
    bento_path: str
    models: tuple[str, ...]
    mount_point: Path
    private_mount: Path
    cache_dir: Path
    cache_size_mib: int
    buffer_size_mib: int
    prefetch: int
    ssd_policy: SsdPolicy
    warmup: bool
    warmup_timeout_seconds: int
    warmup_concurrency: int
    condition_type: str
    cache_min_mbps: float
    juicefs_bin: str
    volume: str = contract.DEFAULT_VOLUME
    node_name: str = ""
    # Node mode: cache_dir is the node cache of this JuiceFS volume, shared
    # by the node's pods, within the node budget. (From the environment the
    # default is common.env's; code that builds Settings itself gets a pod cache.)
    cache_mode: CacheMode = "pod"
    node_cache_budget_mib: int = contract.DEFAULT_NODE_CACHE_BUDGET_MIB
    cache_scan_seconds: int = contract.DEFAULT_CACHE_SCAN_SECONDS
    # The sidecar's own Prometheus endpoint on the pod's IP; 0: none. (From the
    # environment the default is common.env's; code that builds Settings
    # itself, the node agent and tests running sidecars as host processes,
    # gets none, so they never contend for one host port.)
    metrics_port: int = 0
    # The node agent's socket for this pod; always set from the environment.
    # None only where the node agent itself mounts with these settings (its
    # warmer, the benchmarks and storage tests, as root on the node).
    agent_socket: Path | None = None

    def mount_spec(self, cache_size_mib: int | None = None) -> MountSpec:
        """This pod's `juicefs mount`; cache_size_mib: the sidecar's choice, if not the env's."""
        return MountSpec(
            juicefs_bin=self.juicefs_bin,
            meta_url=self.meta_url,
            access_key=self.access_key,
            secret_key=self.secret_key,
            bento_path=self.bento_path,
            bento=f"{self.bento_name}:{self.bento_version}",
            private_mount=self.private_mount,
            mount_point=self.mount_point,
            cache_dir=self.cache_dir,
            cache_size_mib=self.cache_size_mib if cache_size_mib is None else cache_size_mib,
            cache_mode=self.cache_mode,
            cache_scan_seconds=self.cache_scan_seconds,
            buffer_size_mib=self.buffer_size_mib,
            prefetch=self.prefetch,
            warmup_threads=self.warmup_concurrency,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Every variable parsed by its rule; the first bad one is a `SettingsError`."""
        source = os.environ if env is None else env
        c = contract
        try:
            return cls(
                pod_name=c.POD_NAME.read(source),
                pod_namespace=c.POD_NAMESPACE.read(source),
                pod_uid=c.POD_UID.read(source),
                meta_url=c.META_URL.read(source),
                access_key=c.ACCESS_KEY.read(source),
                secret_key=c.SECRET_KEY.read(source),
                bento_name=c.BENTO_NAME.read(source),
                bento_version=c.BENTO_VERSION.read(source),
                bento_path=c.BENTO_PATH.read(source),
                models=c.MODELS.read(source),
                mount_point=c.MOUNT_POINT.read(source),
                private_mount=c.PRIVATE_MOUNT.read(source),
                cache_dir=c.CACHE_DIR.read(source),
                cache_size_mib=c.CACHE_SIZE_MIB.read(source),
                buffer_size_mib=c.BUFFER_SIZE_MIB.read(source),
                prefetch=c.PREFETCH.read(source),
                ssd_policy=c.SSD_POLICY.read(source),
                warmup=c.WARMUP.read(source),
                warmup_timeout_seconds=c.WARMUP_TIMEOUT_SECONDS.read(source),
                warmup_concurrency=c.WARMUP_CONCURRENCY.read(source),
                condition_type=c.CONDITION_TYPE.read(source),
                cache_min_mbps=c.CACHE_MIN_MBPS.read(source),
                juicefs_bin=c.JUICEFS_BIN.read(source),
                volume=c.VOLUME.read(source),
                node_name=c.NODE_NAME.read(source),
                cache_mode=c.CACHE_MODE.read(source),
                node_cache_budget_mib=c.NODE_CACHE_BUDGET_MIB.read(source),
                cache_scan_seconds=c.CACHE_SCAN_SECONDS.read(source),
                metrics_port=c.METRICS_PORT.read(source),
                agent_socket=c.AGENT_SOCKET.read(source),
            )
        except EnvError as err:
            raise SettingsError(str(err)) from None
