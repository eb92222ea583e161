"""The agent's JuiceFS work: mount one Bento like a sidecar would, warm or evict its blocks.

Each Bento is mounted on its own (read-only, `--subdir` of its directory,
the node cache dir of its volume as the cache dir, the node budget as the
sidecars compute it) only while the agent works on it. Warming is the
sidecar's own `stream_model`: every file read through the mount and proven
against the manifest (which must name the Bento and have every model
chosen), a file that differs read once more after its cached blocks are
evicted, then the cache completed with `juicefs warmup`. A
restarted agent's fresh mount finds the blocks already on disk (juicefs
scans its cache dir at start), so an interrupted warm resumes where it was.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from injector.config import InjectorConfig
from nodeagent.workloads import WantedBento
from sidecar.env import Settings
from modelstore.manifest import Manifest, ManifestFile, bento_tag, files_to_verify, read_manifest
from modelstore.mount import CacheCheck, JuiceFSMount
from sidecar.run import stream_model
from modelstore.sources import MountCounters
from modelstore.streamer import ErrorCallback, Progress, ProgressCallback

MIB = 1 << 20


class CredentialsError(Exception):
    """The volume's credentials are not where the DaemonSet mounts them."""


@dataclass(frozen=True)
class AgentIdentity:
    node_name: str
    pod_name: str
    pod_namespace: str


@dataclass(frozen=True)
class Credentials:
    meta_url: str
    access_key: str | None
    secret_key: str | None


def read_credentials(directory: Path, config: InjectorConfig) -> Credentials:
    """The volume's Secret as the DaemonSet mounts it: one file per key."""
    keys = config.juicefs

    def read(key: str) -> str | None:
        try:
            return (directory / key).read_text().strip() or None
        except FileNotFoundError:
            return None

    meta_url = read(keys.meta_url_key)
    if meta_url is None:
        raise CredentialsError(
            f"{directory / keys.meta_url_key} is missing: mount the volume's credentials "
            f"Secret ({config.juicefs.secret_name_template}) at {directory}"
        )
    return Credentials(meta_url, read(keys.access_key_key), read(keys.secret_key_key))


def node_cache_size_mib(config: InjectorConfig) -> int:
    """The JuiceFS --cache-size every client of the node cache gets (as the injector writes it)."""
    return int(config.node_budget_bytes * config.juicefs.cache_fill_ratio) // MIB


def mount_settings(
    config: InjectorConfig,
    want: WantedBento,
    identity: AgentIdentity,
    credentials: Credentials,
    work_dir: Path,
    juicefs_bin: str,
) -> Settings:
    """What the sidecar would run with on this node for this Bento, paths under work_dir."""
    node_cache = config.node_cache_path
    if node_cache is None:
        raise CredentialsError("the config names no node cache directory (cache.nodePath)")
    ref = want.bento
    here = work_dir / ref.volume / ref.name / ref.version
    return Settings(
        pod_name=identity.pod_name,
        pod_namespace=identity.pod_namespace,
        pod_uid="",
        meta_url=credentials.meta_url,
        access_key=credentials.access_key,
        secret_key=credentials.secret_key,
        bento_name=ref.name,
        bento_version=ref.version,
        bento_path=want.bento_path,
        models=want.models,
        mount_point=here / "models",
        private_mount=here / "volume",
        cache_dir=Path(node_cache) / ref.volume,
        cache_size_mib=node_cache_size_mib(config),
        buffer_size_mib=config.juicefs.buffer_size_mib,
        prefetch=config.juicefs.prefetch,
        ssd_policy="off",
        warmup=True,
        warmup_timeout_seconds=config.warmup.timeout_seconds,
        warmup_concurrency=config.warmup.concurrency,
        condition_type=config.readiness.condition_type,
        cache_min_mbps=0,
        juicefs_bin=juicefs_bin,
        volume=ref.volume,
        node_name=identity.node_name,
        cache_mode="node",
        node_cache_budget_mib=config.node_budget_bytes // MIB,
        cache_scan_seconds=config.cache.node_scan_seconds,
    )


@dataclass
class MountedBento:
    """One Bento mounted for the agent: its manifest, and what can be done with its blocks."""

    settings: Settings
    mount: JuiceFSMount

    def manifest(self) -> Manifest:
        return read_manifest(self.mount.bento_dir)

    def files(self, manifest: Manifest) -> list[ManifestFile]:
        """The files to warm and verify (ManifestMismatch: the manifest cannot prove them)."""
        s = self.settings
        return files_to_verify(manifest, bento_tag(s.bento_name, s.bento_version), s.models)

    def listed(self, manifest: Manifest) -> list[ManifestFile]:
        """The files of the chosen models the manifest lists, whatever it says: what to evict."""
        return manifest.select(self.settings.models)

    async def warm(
        self,
        files: list[ManifestFile],
        on_progress: ProgressCallback,
        on_error: ErrorCallback,
    ) -> Progress:
        deadline = time.monotonic() + self.settings.warmup_timeout_seconds
        return await stream_model(
            self.settings,
            self.mount,
            files,
            deadline,
            on_progress=on_progress,
            on_error=on_error,
            filler=self.mount,
            purger=self.mount,  # the agent's mounts always write the node cache
        )

    async def cached(self, files: list[ManifestFile]) -> CacheCheck | None:
        """What the node cache holds of files' blocks (None: juicefs did not say)."""
        return await self.mount.check_cache([self.mount.models_dir / f.path for f in files])

    async def evict(self, files: list[ManifestFile]) -> None:
        await self.mount.evict_cache([self.mount.models_dir / f.path for f in files])

    def counters(self) -> MountCounters:
        return MountCounters(self.mount)


@contextlib.asynccontextmanager
async def mounted(settings: Settings) -> AsyncIterator[MountedBento]:
    mount = JuiceFSMount(settings)
    try:
        await mount.start()
        yield MountedBento(settings, mount)
    finally:
        await mount.stop()
