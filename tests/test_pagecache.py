"""Page-cache advice over a directory tree: every regular file, nothing else, never fails."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from common.pagecache import advise_files


def test_every_regular_file_is_advised_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "w.bin").write_bytes(b"w" * 4096)
    (tmp_path / "top.bin").write_bytes(b"t" * 100)
    (tmp_path / "link").symlink_to("top.bin")  # not followed: counted once
    os.mkfifo(tmp_path / "fifo")  # not a regular file: never opened for reading
    for advice in (os.POSIX_FADV_WILLNEED, os.POSIX_FADV_DONTNEED):
        assert advise_files(tmp_path, advice) == 4196
    assert advise_files(tmp_path / "gone", os.POSIX_FADV_WILLNEED) == 0


def test_a_directory_gone_during_the_walk_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MinIO empties its .trash while the harness advises its data dir: a directory
    listed, then gone when the walk enters it, is skipped (Path.rglob raised)."""
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "k.bin").write_bytes(b"k" * 10)
    (tmp_path / "trash").mkdir()
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Any:
        if Path(path).name == "trash":
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert advise_files(tmp_path, os.POSIX_FADV_DONTNEED) == 10
