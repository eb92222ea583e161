"""The one narrow setting that drives `juicefs mount` of one Bento.

The sidecar builds it from its environment (`sidecar.env.Settings.mount_spec`),
the node agent from its config and the Bento it warms
(`nodeagent.warmer.mount_spec`); `modelstore.mount.JuiceFSMount` reads
nothing else. Like the JuiceFS CSI driver's mount builder: one setting, used
by both the pod's path and the node's path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.env import CacheMode


@dataclass(frozen=True)
class MountSpec:
    juicefs_bin: str
    # The volume: its metadata engine (the URL may carry the password, which
    # juicefs then gets by env) and the object store's keys, if the volume
    # was formatted without its own.
    meta_url: str
    access_key: str | None
    secret_key: str | None
    # The Bento: its directory on the volume (--subdir), and name:version for messages.
    bento_path: str
    bento: str
    # Where juicefs mounts the Bento's directory (the manifest is read there),
    # and where its models/ is bound for the app to read.
    private_mount: Path
    mount_point: Path
    # The cache: its directory and size (0: none), the pod's own or the node's.
    cache_dir: Path
    cache_size_mib: int
    cache_mode: CacheMode
    cache_scan_seconds: int
    buffer_size_mib: int
    prefetch: int
    # Parallel fetches of `juicefs warmup` (fill, check and evict).
    warmup_threads: int
    # The share of the cache disk JuiceFS keeps free (--free-space-ratio);
    # None: JuiceFS's own 10%. The node agent, the node cache's writer, keeps
    # more (nodeagent.plan.DISK_MARGIN): 10% is the kubelet's eviction threshold.
    free_space_ratio: float | None = None
