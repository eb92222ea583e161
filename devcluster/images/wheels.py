"""Wheelhouses: the wheels an image build installs, downloaded on the host.

pip inside a build has no network (`--network none`), and the registry's TLS
chain is not trusted inside the base image anyway, so the host's pip downloads
every wheel first, for the image's Python (CPython 3.11 on manylinux), into a
directory keyed by the requirement files' hash. The build mounts it read-only
at /wheelhouse and installs with `--no-index --find-links`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from devcluster.images.steps import Layout, inputs_key, run, say, step

IMAGE_PYTHON = "3.11"  # Debian bookworm's python3
IMAGE_ABI = "cp311"
IMAGE_GLIBC_MINOR = 36  # bookworm's glibc 2.36


def image_platforms(machine: str | None = None) -> list[str]:
    """Wheel platform tags the image's glibc accepts (pip does not expand --platform)."""
    arch = machine or os.uname().machine
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(IMAGE_GLIBC_MINOR, 16, -1)]
    return tags + [f"manylinux{legacy}_{arch}" for legacy in ("2014", "2010", "1")]


def _target_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", IMAGE_PYTHON, "--implementation", "cp"]
    args += ["--abi", IMAGE_ABI]
    for tag in image_platforms():
        args += ["--platform", tag]
    return args


def ensure_wheelhouse(
    layout: Layout,
    name: str,
    *,
    hashed_files: list[Path],
    plain_files: list[Path],
) -> Path:
    """A directory of the wheels the requirement files name, downloaded once per inputs hash.

    hashed_files are installed with `--require-hashes` (pip wants every
    requirement of one command hashed or none), so they get their own download.
    """
    key = inputs_key(
        texts=[IMAGE_PYTHON, IMAGE_ABI, *image_platforms()]
        + [f"{p.name}\0{p.read_text()}" for p in [*hashed_files, *plain_files]]
    )
    house = layout.wheels / f"{name}-{key}"
    if house.is_dir():
        say(f"wheelhouse {house.name}: cached ({len(list(house.iterdir()))} files)")
        return house
    partial = layout.wheels / f".{house.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    log = layout.logs / f"wheels-{name}.log"
    pip: list[str | Path] = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check"]
    pip += ["-d", partial]
    with step(f"wheelhouse {house.name}: pip download"):
        for hashed in hashed_files:
            run(
                [*pip, *_target_args(), "--require-hashes", "-r", hashed],
                log,
                what=f"pip download -r {hashed}",
            )
        if plain_files:
            plain = [arg for path in plain_files for arg in ("-r", str(path))]
            run([*pip, *_target_args(), *plain], log, what="pip download")
        os.replace(partial, house)
    size = sum(p.stat().st_size for p in house.iterdir()) >> 20
    say(f"wheelhouse {house.name}: {len(list(house.iterdir()))} files, {size} MiB")
    return house
