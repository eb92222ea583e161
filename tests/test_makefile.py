"""The Makefile's promises: `make help` lists every target; the fast lane needs nothing built.

`make test` runs `make fast` (lint, type-check, every test outside
SLOW_TESTS) before building binaries and images for SLOW_TESTS; a test
module that needs the binaries, the images, the storage stack or root must
be under one of SLOW_TESTS' paths, and each path must exist (a moved test
directory would otherwise slip into the fast lane).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAKEFILE = REPO / "Makefile"

# What a test module uses when it needs something the fast lane does not have.
NEEDS_SLOW_LANE = (
    "ensure_binaries",  # the pinned binaries (make binaries)
    "CHART_COMPONENTS",
    "tests.kit.chart",  # helm template and kubectl kustomize with the pinned binaries
    "ensure_images",  # the node's images (make images)
    "storage_stack",  # MinIO, Redis, JuiceFS and FUSE mounts
    "StorageStack",
    "ensure_packages",  # apt-get install: root
    "local_cluster",  # a control plane and a node
    '["mount"',  # mounts: root
    '["unshare"',
)


def _logical_lines() -> list[str]:
    """The Makefile's lines with backslash continuations joined."""
    return MAKEFILE.read_text().replace("\\\n", " ").splitlines()


def targets() -> set[str]:
    """Every rule's name (not the file targets such as $(STAMP), not special ones)."""
    found: set[str] = set()
    for line in _logical_lines():
        match = re.match(r"^([A-Za-z][\w.-]*(?:\s+[A-Za-z][\w.-]*)*)\s*:(?![:=])", line)
        if match:
            found.update(match.group(1).split())
    return found


def phony() -> set[str]:
    declared: set[str] = set()
    for line in _logical_lines():
        if line.startswith(".PHONY:"):
            declared.update(line.removeprefix(".PHONY:").split())
    return declared


def variable(name: str) -> list[str]:
    for line in _logical_lines():
        match = re.match(rf"^{name}\s*:?=(.*)$", line)
        if match:
            return match.group(1).split()
    raise AssertionError(f"the Makefile sets no {name}")


def test_targets_are_found() -> None:
    assert {"help", "test", "fast", "unit", "e2e", "lint", "typecheck", "clean"} <= targets()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_help_lists_every_target() -> None:
    out = subprocess.run(
        ["make", "--no-print-directory", "-s", "-C", str(REPO), "help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    listed = set(re.findall(r"^make ([\w.-]+)", out, re.M))
    assert targets() - listed == set(), "add these to `make help`"
    assert listed - targets() == set(), "`make help` lists targets that do not exist"


def test_every_target_is_phony() -> None:
    assert targets() == phony()


def test_the_slow_lane_paths_exist() -> None:
    slow = variable("SLOW_TESTS")
    assert slow
    for path in slow:
        assert (REPO / path).exists(), f"SLOW_TESTS names {path}, which does not exist"
    # The second stage's kustomize run re-runs e2e tests only.
    for path in variable("KUSTOMIZE_E2E"):
        assert path.startswith("tests/e2e/"), path


def test_the_fast_lane_reaches_for_nothing_built() -> None:
    slow = [REPO / path for path in variable("SLOW_TESTS")]
    misplaced = []
    for module in sorted((REPO / "tests").rglob("test_*.py")):
        if module == Path(__file__).resolve() or any(module.is_relative_to(p) for p in slow):
            continue
        code = module.read_text()
        used = [needle for needle in NEEDS_SLOW_LANE if needle in code]
        if used:
            misplaced.append(f"{module.relative_to(REPO)} ({', '.join(used)})")
    assert misplaced == [], "add these to SLOW_TESTS in the Makefile, or stop using that"
