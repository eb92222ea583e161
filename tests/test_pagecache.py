"""Page-cache advice over a directory tree: every regular file, nothing else, never fails."""

from __future__ import annotations

import os
from pathlib import Path

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
