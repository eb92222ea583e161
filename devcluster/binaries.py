"""Locate the upstream binaries: `hack/build-binaries.sh`, or a directory from the env."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-binaries.sh"
BIN_DIR_ENV = "BENTO_JUICEFS_BIN_DIR"

CONTROL_PLANE_COMPONENTS: tuple[str, ...] = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
)
NODE_COMPONENTS: tuple[str, ...] = (
    "kubelet",
    "kube-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
)

# Rendering and linting the Helm chart against the kustomize overlays (tests/test_chart.py).
CHART_COMPONENTS: tuple[str, ...] = ("helm", "kubectl")


class BinariesError(RuntimeError):
    """A binary could not be built or found."""


def ensure_binaries(
    components: Sequence[str] = CONTROL_PLANE_COMPONENTS,
    *,
    script: Path = BUILD_SCRIPT,
) -> dict[str, Path]:
    """Absolute paths of the requested binaries, building them if needed.

    With `$BENTO_JUICEFS_BIN_DIR` set, each binary is taken from that directory
    and nothing is built. Otherwise the build script runs (its progress goes
    straight to our stderr; it reuses its cache, so a warm call takes well under
    a second) and its `<component>=<path>` stdout lines are parsed.
    """
    wanted = list(dict.fromkeys(components))
    override = os.environ.get(BIN_DIR_ENV)
    if override:
        found = {name: Path(override, name).resolve() for name in wanted}
        missing = [str(p) for p in found.values() if not os.access(p, os.X_OK)]
        if missing:
            raise BinariesError(f"${BIN_DIR_ENV}={override}: not executable: {', '.join(missing)}")
        return found

    if not script.is_file():
        raise BinariesError(f"build script not found: {script} (set ${BIN_DIR_ENV} instead)")
    proc = subprocess.run(
        ["bash", str(script), *wanted],
        stdout=subprocess.PIPE,
        stderr=None,  # inherited: build progress streams to our stderr
        stdin=subprocess.DEVNULL,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BinariesError(f"{script} {' '.join(wanted)} failed with exit code {proc.returncode}")
    paths: dict[str, Path] = {}
    for line in proc.stdout.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name in wanted:
            paths[name] = Path(value)
    missing = [name for name in wanted if name not in paths or not os.access(paths[name], os.X_OK)]
    if missing:
        raise BinariesError(f"{script} did not provide: {', '.join(missing)}")
    return paths
