"""The commit-msg hook (hack/commit_subject.py) refuses a long subject and a glued body."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HOOK = Path(__file__).resolve().parent.parent / "hack" / "commit_subject.py"


def hook(tmp_path: Path, message: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "COMMIT_EDITMSG"
    path.write_text(message)
    return subprocess.run(
        [sys.executable, str(HOOK), str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    "message",
    [
        "Agent: bind a pod's socket again when the kubelet's tmpfs hides it\n",
        "x" * 72 + "\n\nA body line much longer than seventy-two characters is fine here.\n",
        "# Please enter the commit message\nSubject\n\nBody\n# a comment\n",
    ],
)
def test_a_short_subject_passes(tmp_path: Path, message: str) -> None:
    result = hook(tmp_path, message)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("message", "said"),
    [
        ("x" * 73 + "\n", "the subject is 73 characters, at most 72 are accepted"),
        ("Subject\nbody glued to it\n", "the second line must be blank"),
        ("\n\nbody\n", "no subject line"),
    ],
)
def test_a_long_subject_or_a_glued_body_is_refused(tmp_path: Path, message: str, said: str) -> None:
    result = hook(tmp_path, message)
    assert result.returncode == 1
    assert said in result.stderr
