"""The hash-locked dependency sets (`make lock`) agree with pyproject.toml and are used.

requirements/dev.txt is what `make venv` (so CI) installs, requirements/runtime.txt
what the image installs, requirements/build.txt what builds the project's wheel
in the image (the local pipeline's wheelhouse holds only it); all from uv for
CPython 3.11 on every platform. Here:
every dependency pyproject.toml names is pinned, at a version its specifier
accepts, with hashes; the runtime set is the dev set's versions (the tests ran
what the image ships); and the Makefile and the Dockerfile install them with
--require-hashes.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
DEV = REPO / "requirements" / "dev.txt"
RUNTIME = REPO / "requirements" / "runtime.txt"
BUILD = REPO / "requirements" / "build.txt"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)(?: ;.*)?$")


def pins(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of a `uv pip compile --generate-hashes` file."""
    found: dict[str, tuple[str, int]] = {}
    entries = re.split(r"\n(?=\S)", path.read_text())
    for entry in entries:
        first, *rest = entry.replace("\\\n", "\n").splitlines()
        match = _PIN.match(first.rstrip(" \\"))
        if match is None:
            continue
        hashes = sum(1 for line in rest if line.strip().startswith("--hash=sha256:"))
        found[canonicalize_name(match[1])] = (match[2], hashes)
    return found


def declared(extra: str | None = None) -> list[Requirement]:
    names = PYPROJECT["project"]["dependencies"]
    if extra == "build":
        names = PYPROJECT["build-system"]["requires"]
    elif extra is not None:
        names = PYPROJECT["project"]["optional-dependencies"][extra]
    return [Requirement(text) for text in names]


def test_the_parser_reads_a_pin_with_its_hashes() -> None:
    assert pins(RUNTIME)["aiohttp"][1] > 1


@pytest.mark.parametrize(
    ("lock", "requirements"),
    [
        (RUNTIME, declared()),
        (DEV, declared()),
        (DEV, declared("dev")),
        (BUILD, declared("build")),
    ],
    ids=["runtime", "dev-runtime", "dev-extras", "build"],
)
def test_every_declared_dependency_is_pinned_within_its_specifier_with_hashes(
    lock: Path, requirements: list[Requirement]
) -> None:
    locked = pins(lock)
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is not in {lock.name}: run make lock"
        version, hashes = locked[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock.name} pins {name}=={version}, outside {requirement}: run make lock"
        )
        assert hashes, f"{name} has no hash in {lock.name}"


def test_every_pin_has_hashes() -> None:
    for lock in (DEV, RUNTIME, BUILD):
        unhashed = [name for name, (_, hashes) in pins(lock).items() if not hashes]
        assert not unhashed, f"{lock.name}: {unhashed}"


def test_the_image_ships_the_versions_the_tests_ran() -> None:
    dev = pins(DEV)
    differ = {
        n: (v, dev.get(n, ("-",))[0])
        for n, (v, _) in pins(RUNTIME).items()
        if dev.get(n, ("",))[0] != v
    }
    assert not differ, f"runtime.txt against dev.txt: {differ}"


def test_the_venv_and_the_image_install_the_locks_with_hashes() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "pip install --quiet --require-hashes -r requirements/dev.txt" in makefile
    assert "pip install --quiet --no-deps -e ." in makefile
    assert "-e '.[dev]'" not in makefile
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = re.search(r"^COPY requirements/runtime\.txt (\S+)$", dockerfile, re.M)
    assert copied
    installed = Path(copied.group(1)).name
    assert f'pip install "$@" --require-hashes -r {installed};' in dockerfile
