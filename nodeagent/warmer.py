"""The agent's JuiceFS work: mount one Bento as a sidecar would, warm or evict its blocks.

Each Bento is mounted on its own (read-only, `--subdir` of its directory,
the node cache dir of its volume as the cache dir, the node budget as the
sidecars compute it) only while the agent works on it. Warming is the
model store's `stream_model`, as in a sidecar: every file read through the
mount and proven against the manifest (which must name the Bento and have
every model chosen), a file that differs read once more after its cached
blocks are evicted, then the cache completed with `juicefs warmup`. A
restarted agent's fresh mount finds the blocks already on disk (juicefs
scans its cache dir at start), so an interrupted warm resumes where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from common.warm import BentoRef
from injector.config import InjectorConfig, Warmup
from modelstore.exposition import JuiceFSRelay
from modelstore.juicefs_output import CacheCheck
from modelstore.localcopy import LocalCopy, copy_root
from modelstore.manifest import Manifest, ManifestFile, bento_tag, files_to_verify, read_manifest
from modelstore.mount import JuiceFSMount
from modelstore.mountspec import MountSpec
from modelstore.sources import MountCounters
from modelstore.streamer import (
    ErrorCallback,
    Progress,
    ProgressCallback,
    WarmupTimeout,
    stream_model,
)
from nodeagent.workloads import WantedBento

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


def mount_spec(
    config: InjectorConfig,
    want: WantedBento,
    credentials: Credentials,
    work_dir: Path,
    juicefs_bin: str,
    disk_margin: float = 0.0,
    blocks: bool = True,
) -> MountSpec:
    """The `juicefs mount` a node-cache sidecar gets for this Bento, paths under work_dir.

    The cache is the node cache of the Bento's volume, sized as the injector
    sizes it for every client of that directory; the agent, as root on the
    node, writes it, keeping disk_margin of the disk free (JuiceFS's own 10%
    when 0). Without blocks the client keeps no cache at all (--cache-size
    0): a warm that writes the Bento's local copy, the node's one copy of it.
    """
    node_cache = config.node_cache_path
    if node_cache is None:
        raise CredentialsError("the config names no node cache directory (cache.nodePath)")
    ref = want.bento
    here = work_dir / ref.volume / ref.name / ref.version
    return MountSpec(
        juicefs_bin=juicefs_bin,
        meta_url=credentials.meta_url,
        access_key=credentials.access_key,
        secret_key=credentials.secret_key,
        bento_path=want.bento_path,
        bento=f"{ref.name}:{ref.version}",
        private_mount=here / "volume",
        mount_point=here / "models",
        cache_dir=Path(node_cache) / ref.volume,
        cache_size_mib=node_cache_size_mib(config) if blocks else 0,
        cache_mode="node",
        cache_scan_seconds=config.cache.node_scan_seconds,
        buffer_size_mib=config.juicefs.buffer_size_mib,
        prefetch=config.juicefs.prefetch,
        warmup_threads=config.warmup.concurrency,
        free_space_ratio=disk_margin or None,
    )


# Under the node cache's root, beside the volumes' cache directories (a
# volume name never starts with a dot); bound into no pod as a whole.
LOCAL_COPIES_DIR = ".local-copies"


def copy_of(config: InjectorConfig, ref: BentoRef) -> LocalCopy | None:
    """Where ref's local copy is, kept or not; None without a node cache."""
    node_cache = config.node_cache_path
    if node_cache is None:
        return None
    copies = Path(node_cache) / LOCAL_COPIES_DIR
    return LocalCopy(copy_root(copies, ref.volume, ref.name, ref.version))


def local_copy(config: InjectorConfig, ref: BentoRef) -> LocalCopy | None:
    """ref's local copy when the config keeps one (cache.localCopy)."""
    return copy_of(config, ref) if config.cache.local_copy else None


def kept_copy(config: InjectorConfig, want: WantedBento) -> LocalCopy | None:
    """The local copy a warm of want writes instead of node cache blocks, if any.

    Only a warm of every model keeps one: a pod is given a copy only as its
    whole models/ (what JuiceFS holds, nothing less), so a copy of some
    models would never be served. A warm of some models keeps blocks, read
    through FUSE by the pods that select those models.
    """
    return None if want.models else local_copy(config, want.bento)


def wanted_files(want: WantedBento, manifest: Manifest) -> list[ManifestFile]:
    """The files of want's models the manifest proves (ManifestMismatch: it cannot)."""
    ref = want.bento
    return files_to_verify(manifest, bento_tag(ref.name, ref.version), want.models)


@dataclass
class MountedBento:
    """One Bento mounted for the agent: its manifest, and what can be done with its blocks."""

    want: WantedBento
    mount: JuiceFSMount
    warmup: Warmup

    def manifest(self) -> Manifest:
        return read_manifest(self.mount.bento_dir)

    def files(self, manifest: Manifest) -> list[ManifestFile]:
        """The files to warm and verify (ManifestMismatch: the manifest cannot prove them)."""
        return wanted_files(self.want, manifest)

    def listed(self, manifest: Manifest) -> list[ManifestFile]:
        """The files of the chosen models the manifest lists, whatever it says: what to evict."""
        return manifest.select(self.want.models)

    async def warm(
        self,
        files: list[ManifestFile],
        on_progress: ProgressCallback,
        on_error: ErrorCallback,
        copy: LocalCopy | None = None,
        manifest: Manifest | None = None,
    ) -> Progress:
        """Stream and verify files into the node cache, then fill it: every block, or an error.

        With copy (and a mount that keeps no blocks: `mount_spec`), each file
        proven is kept there instead, and the copy is recorded as holding
        files once every one is in, with manifest (the one files came from,
        kept beside the copy for later seals).

        A sidecar's fill is best effort (`fill_cache_until` logs its failure:
        its bytes are verified already); the agent's record says "warm", which
        seals pods, so the fill's own MountError (the cache still short after
        its rounds of `juicefs warmup --check`) passes up as WarmFailed, and a
        fill past the deadline is a WarmupTimeout: never a partial fill
        recorded as warm.
        """
        deadline = time.monotonic() + self.warmup.timeout_seconds
        todo = files
        if copy is not None:
            await asyncio.to_thread(copy.begin)
            kept = await asyncio.to_thread(copy.proven, files)
            todo = [f for f in files if f not in kept]
        if not todo and copy is not None:  # all proven before a restart: only the record
            await asyncio.to_thread(copy.seal, files, manifest)
            return Progress(total_bytes=0, total_files=0)
        progress = await stream_model(
            self.warmup.concurrency,
            self.mount,
            todo,
            deadline,
            on_progress=on_progress,
            on_error=on_error,
            # Read once more after evicting its blocks: only where blocks are kept.
            purger=self.mount if self.mount.caches_blocks else None,
            copy=copy,
            # No one else reads the agent's own mount: its pages would only
            # crowd the copy's out of the agent's memory cgroup.
            drop_reads=True,
        )
        paths = [self.mount.models_dir / f.path for f in todo]
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 1.0)):
                await self.mount.fill_cache(paths)
        except TimeoutError:
            raise WarmupTimeout("the node cache was not filled by the warmup deadline") from None
        if copy is not None:
            await asyncio.to_thread(copy.seal, files, manifest)
        return progress

    async def cached(self, files: list[ManifestFile]) -> CacheCheck | None:
        """What the node cache holds of files' blocks (None: juicefs did not say)."""
        return await self.mount.check_cache([self.mount.models_dir / f.path for f in files])

    async def evict(self, files: list[ManifestFile]) -> None:
        await self.mount.evict_cache([self.mount.models_dir / f.path for f in files])

    def counters(self) -> MountCounters:
        return MountCounters(self.mount)


@contextlib.asynccontextmanager
async def mounted(
    spec: MountSpec, want: WantedBento, warmup: Warmup, relay: JuiceFSRelay | None = None
) -> AsyncIterator[MountedBento]:
    """want mounted for as long as the context lasts; relay serves its juicefs's metrics."""
    mount = JuiceFSMount(spec)
    if relay is not None:
        relay.add(mount)
    try:
        await mount.start()
        yield MountedBento(want, mount, warmup)
    finally:
        await mount.stop()
        if relay is not None:
            relay.remove(mount)
