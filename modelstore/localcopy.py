"""A verified copy of a Bento's model files on the node's local disk, written while streaming.

The node agent streams every file of a Bento through its JuiceFS mount and
proves it against the manifest (`modelstore.streamer`). With a `LocalCopy`
the same bytes, as they are read, are also written to a plain file on the
node's local disk; a file becomes part of the copy (renamed from its
`.partial` name) only once its size and sha256 matched the manifest. Once
every file is in, `seal` records what the copy holds (`verified.json`:
path, size, sha256 of each file), and only a recorded copy is ever served.

JuiceFS stays the transport and the source of truth: the copy is derived
from what JuiceFS served and the manifest proved, and the node cache's
blocks stay where they are. What the copy adds is the read path: the app
reads its model from the local disk and the kernel's page cache, with no
FUSE daemon in between (BENCHMARKS.md, issue 18: through FUSE the app's
load was 1.6-1.9x its load from a local directory on two cores).

Layout, under a root only the agent writes (a directory per Bento version):

    <root>/models/<file path from the manifest>   what the pod is given, read-only
    <root>/verified.json                          written last, by `seal`

Manifest paths are relative and stay inside models/ (`modelstore.manifest`),
and the agent alone creates the directories, so no path here leads out of
the root.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from modelstore.manifest import ManifestFile

MODELS_DIR = "models"
RECORD_NAME = "verified.json"
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class CopiedFile:
    size: int
    sha256: str


def parse_record(text: str) -> dict[str, CopiedFile]:
    """verified.json's entries by path; ValueError when it is not one."""
    entries = json.loads(text)
    if not isinstance(entries, list):
        raise ValueError("verified.json is not a list")
    out: dict[str, CopiedFile] = {}
    for entry in entries:
        out[str(entry["path"])] = CopiedFile(int(entry["size"]), str(entry["sha256"]))
    return out


def render_record(files: Iterable[ManifestFile]) -> str:
    entries = [
        {"path": f.path, "size": f.size, "sha256": f.sha256}
        for f in sorted(files, key=lambda f: f.path)
    ]
    return json.dumps(entries, separators=(",", ":"))


def record_covers(
    record: Mapping[str, CopiedFile], files: Iterable[ManifestFile], sizes: Mapping[str, int]
) -> bool:
    """Whether a copy recorded as record, whose files on disk have sizes, holds files.

    Every file must be recorded with the manifest's size and sha256 (a newer
    manifest with other bytes for a path is not this copy) and be on disk, a
    regular file of that size (sizes: what lstat found; a missing or odd file
    is absent from it).
    """
    for entry in files:
        copied = record.get(entry.path)
        if copied is None or copied != CopiedFile(entry.size, entry.sha256):
            return False
        if sizes.get(entry.path) != entry.size:
            return False
    return True


@dataclass(frozen=True)
class LocalCopy:
    """One Bento version's copy under root (see the module's doc for the layout)."""

    root: Path

    @property
    def models_dir(self) -> Path:
        return self.root / MODELS_DIR

    @property
    def record_path(self) -> Path:
        return self.root / RECORD_NAME

    # Used by the streamer, in its reading threads.

    def open(self, entry: ManifestFile) -> int:
        """A descriptor to write entry's bytes into at their offsets (a fresh .partial file).

        Opening says nothing of the copy: an earlier record is dropped first,
        since this file is about to change.
        """
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()
        target = self.models_dir / (entry.path + PARTIAL_SUFFIX)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(target, flags, 0o644)

    def write(self, fd: int, data: bytes, offset: int) -> None:
        os.pwrite(fd, data, offset)

    def keep(self, entry: ManifestFile, fd: int) -> None:
        """entry's bytes were proven: the .partial file becomes the copy's file.

        fd is closed whatever happens; on a failure no .partial file is left.
        """
        partial = self.models_dir / (entry.path + PARTIAL_SUFFIX)
        try:
            try:
                os.ftruncate(fd, entry.size)
            finally:
                os.close(fd)
            os.rename(partial, self.models_dir / entry.path)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            raise

    def drop(self, entry: ManifestFile, fd: int) -> None:
        """entry's bytes were not proven (or the read failed): no trace of them is kept."""
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            (self.models_dir / (entry.path + PARTIAL_SUFFIX)).unlink()

    # Used by the agent.

    def seal(self, files: Iterable[ManifestFile]) -> None:
        """Record the copy as holding files (each kept already), atomically."""
        staged = self.root / (RECORD_NAME + PARTIAL_SUFFIX)
        staged.write_text(render_record(files))
        os.rename(staged, self.record_path)

    def covers(self, files: list[ManifestFile]) -> bool:
        """Whether the copy holds every one of files, recorded and on disk as the manifest says."""
        try:
            record = parse_record(self.record_path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return False
        sizes: dict[str, int] = {}
        for entry in files:
            try:
                found = os.lstat(self.models_dir / entry.path)
            except OSError:
                continue
            if stat.S_ISREG(found.st_mode):
                sizes[entry.path] = found.st_size
        return record_covers(record, files, sizes)

    def remove(self) -> None:
        """The whole copy goes (the record first, so a half-removed copy is never served)."""
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()
        shutil.rmtree(self.root, ignore_errors=True)


def prefetch(models_dir: Path) -> None:
    """Ask the kernel to read every file of a copy into the page cache (blocking).

    A pod given the copy reads it file by file, reading and hashing in turn;
    from a cold page cache (an 8 GiB copy does not stay in the agent's
    memory limit) that ran at about 370 MiB/s on the dev node against
    600 MB/s off its disk. Readahead of whole files, issued as the pod's
    containers start, keeps the disk busy ahead of the app. Advice only.
    """
    for path in sorted(p for p in models_dir.rglob("*") if p.is_file()):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def copy_root(copies_dir: Path, volume: str, name: str, version: str) -> Path:
    """Where a Bento version's copy lives under the node's copies directory."""
    return copies_dir / volume / name / version
