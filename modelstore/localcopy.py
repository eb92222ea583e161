"""A verified copy of a Bento's model files on the node's local disk, written while streaming.

The node agent streams every file of a Bento through its JuiceFS mount and
proves it against the manifest (`modelstore.streamer`). With a `LocalCopy`
the same bytes, as they are read, are also written to a plain file on the
node's local disk; a file becomes part of the copy (renamed from the
staging directory into models/) only once its size and sha256 matched the
manifest. Once
every file is in, `seal` records what the copy holds (`verified.json`:
path, size, sha256 of each file), and only a recorded copy is ever served.

JuiceFS stays the transport and the source of truth: the copy is derived
from what JuiceFS served and the manifest proved. For a Bento warmed with
every model the copy is the node's only local copy: the agent's JuiceFS
client writes no cache blocks for it. What the copy adds is the read path: the app
reads its model from the local disk and the kernel's page cache, with no
FUSE daemon in between (BENCHMARKS.md, issue 18: through FUSE the app's
load was 1.6-1.9x its load from a local directory on two cores).

Layout, under a root only the agent writes (a directory per Bento version):

    <root>/models/<file path from the manifest>   what the pod is given, read-only
    <root>/staging/<file path>                    a file being written, until proven
    <root>/kept.jsonl                             each file proven so far (path, size, sha256)
    <root>/manifest.json                          the manifest proved against, by `seal`
    <root>/verified.json                          written last, by `seal`

A file is written under staging/, never under models/, so a pod still bound
to the copy while it is written again (the agent found it short) sees only
whole, proven files.

kept.jsonl is what makes a warm resumable: an agent restarted mid-warm
finds each file already proven there, on disk at its size, and streams
only the rest (`proven`), as it used to find the node cache's blocks.

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

from common.pagecache import advise_files
from modelstore.manifest import MANIFEST_NAME, Manifest, ManifestFile

MODELS_DIR = "models"
STAGING_DIR = "staging"
RECORD_NAME = "verified.json"
JOURNAL_NAME = "kept.jsonl"
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


def parse_journal(text: str) -> dict[str, CopiedFile]:
    """kept.jsonl's entries by path, the last one for a path winning; a torn or odd line
    (the agent stopped mid-write) is skipped: its file is streamed again."""
    out: dict[str, CopiedFile] = {}
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            out[str(entry["path"])] = CopiedFile(int(entry["size"]), str(entry["sha256"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def resumable(written: int, size: int, range_bytes: int) -> int:
    """How much of a staged file an earlier warm left is resumed from: whole ranges only,
    never past the manifest's size (a range being written when the agent stopped is
    read again; the whole file's sha256 still decides)."""
    return min(max(written, 0), size) // range_bytes * range_bytes


def _entry_json(entry: ManifestFile) -> dict[str, object]:
    return {"path": entry.path, "size": entry.size, "sha256": entry.sha256}


def render_record(files: Iterable[ManifestFile]) -> str:
    entries = [_entry_json(f) for f in sorted(files, key=lambda f: f.path)]
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

    def _staged(self, entry: ManifestFile) -> Path:
        return self.root / STAGING_DIR / entry.path

    # Used by the agent, before a warm writes any file.

    def begin(self) -> None:
        """The copy is about to change: its record goes first, so nothing serves it meanwhile."""
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()

    # Used by the streamer (`begin` came first).

    def open(self, entry: ManifestFile, range_bytes: int) -> tuple[int, int]:
        """A descriptor to write entry's bytes into at their offsets (its staged file), and
        how many bytes from the start a warm stopped part-way left there (`resumable`)."""
        target = self._staged(entry)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(target, flags, 0o644)
        try:
            resumed = resumable(os.fstat(fd).st_size, entry.size, range_bytes)
            os.ftruncate(fd, resumed)
        except OSError:
            os.close(fd)
            raise
        return fd, resumed

    def keep(self, entry: ManifestFile, fd: int) -> None:
        """entry's bytes were proven: the staged file becomes the copy's file.

        fd is closed whatever happens; on a failure no staged file is left.
        """
        partial = self._staged(entry)
        target = self.models_dir / entry.path
        try:
            try:
                os.ftruncate(fd, entry.size)
            finally:
                os.close(fd)
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            os.rename(partial, target)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            raise
        with (self.root / JOURNAL_NAME).open("a") as journal:
            journal.write(json.dumps(_entry_json(entry), separators=(",", ":")) + "\n")

    def drop(self, entry: ManifestFile, fd: int) -> None:
        """entry's bytes were not proven (or the read failed): no trace of them is kept."""
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            self._staged(entry).unlink()

    def pause(self, entry: ManifestFile, fd: int) -> None:
        """The warm was cancelled (the agent stopping): entry's staged file stays, for the
        next warm to resume from. Proven or not, it is never served from staging/."""
        os.close(fd)

    # Used by the agent.

    def seal(self, files: Iterable[ManifestFile], manifest: Manifest | None = None) -> None:
        """Record the copy as holding files (each kept already), atomically; with the manifest
        they were proved against, kept first, so that a later seal need not mount JuiceFS
        to read it (a Bento version is immutable)."""
        if manifest is not None:
            self._write_atomically(MANIFEST_NAME, manifest.model_dump_json())
        self._write_atomically(RECORD_NAME, render_record(files))

    def _write_atomically(self, name: str, text: str) -> None:
        staged = self.root / (name + PARTIAL_SUFFIX)
        staged.write_text(text)
        os.rename(staged, self.root / name)

    def manifest(self) -> Manifest | None:
        """The manifest the copy was proved against, if kept and readable (blocking)."""
        try:
            return Manifest.model_validate_json((self.root / MANIFEST_NAME).read_bytes())
        except (OSError, ValueError):
            return None

    def covers(self, files: list[ManifestFile]) -> bool:
        """Whether the copy holds every one of files, recorded and on disk as the manifest says."""
        try:
            record = parse_record(self.record_path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return record_covers(record, files, self._sizes(files))

    def proven(self, files: list[ManifestFile]) -> list[ManifestFile]:
        """Those of files a warm already proved and kept (kept.jsonl), still on disk whole:
        what a warm resumed after a restart, or run again over a short copy, need not stream."""
        try:
            journal = parse_journal((self.root / JOURNAL_NAME).read_text())
        except OSError:
            return []
        sizes = self._sizes(files)
        return [f for f in files if record_covers(journal, [f], sizes)]

    def _sizes(self, files: list[ManifestFile]) -> dict[str, int]:
        """The size of each of files found in models/ as a regular file."""
        sizes: dict[str, int] = {}
        for entry in files:
            try:
                found = os.lstat(self.models_dir / entry.path)
            except OSError:
                continue
            if stat.S_ISREG(found.st_mode):
                sizes[entry.path] = found.st_size
        return sizes

    def remove(self) -> None:
        """The whole copy goes (the record first, so a half-removed copy is never served)."""
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()
        shutil.rmtree(self.root, ignore_errors=True)


def prefetch(models_dir: Path) -> None:
    """Ask the kernel to read every file of a copy into the page cache (blocking).

    A pod given the copy reads it file by file, reading and hashing in turn;
    from a cold page cache (the copy evicted since it was written) that ran
    at about 370 MiB/s on the dev node against 600 MB/s off its disk.
    Readahead of whole files, issued as the pod's containers start, keeps
    the disk busy ahead of the app. Advice only.
    """
    advise_files(models_dir, os.POSIX_FADV_WILLNEED)


def copy_root(copies_dir: Path, volume: str, name: str, version: str) -> Path:
    """Where a Bento version's copy lives under the node's copies directory."""
    return copies_dir / volume / name / version
