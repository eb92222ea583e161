"""What every image step shares: the cache layout, timed steps, commands, input hashes."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.processes import log_tail

CACHE_ENV = "BENTO_JUICEFS_CACHE"
KEY_LENGTH = 16  # hex digits of an inputs hash used in file names and tags
_SKIPPED_PARTS = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"})


class ImagesError(RuntimeError):
    """An image could not be built, exported or imported."""


@dataclass(frozen=True)
class ImageArchive:
    """An image exported as an OCI archive: its name, the file, its manifest digest.

    `seconds` is what this call spent producing it (0.0 when it came from the cache).
    """

    name: str
    path: Path
    digest: str
    seconds: float = field(default=0.0, compare=False)

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def oci_arch() -> str:
    """This machine's architecture in OCI terms (amd64, arm64, ...)."""
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def default_cache_dir() -> Path:
    """`${BENTO_JUICEFS_CACHE:-~/.cache/bento-juicefs}/images`."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "bento-juicefs")
    return Path(root).expanduser() / "images"


@dataclass(frozen=True)
class Layout:
    """Where everything lives under the images cache dir."""

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def wheels(self) -> Path:
        return self.root / "wheels"

    @property
    def archives(self) -> Path:
        return self.root / "archives"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def buildah_root(self) -> Path:
        return self.root / "buildah" / "storage"

    @property
    def buildah_runroot(self) -> Path:
        return self.root / "buildah" / "run"

    def create(self) -> None:
        for path in (self.base, self.wheels, self.archives, self.logs, self.tmp):
            path.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cache's lock (one builder at a time, across processes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"waiting for another build holding {self.root / '.lock'}")
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def say(message: str) -> None:
    print(f"images: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """Print one line when the step ends: what, and how many seconds it took."""
    started = time.monotonic()
    try:
        yield
    except BaseException:
        say(f"{what}: failed after {time.monotonic() - started:.1f} s")
        raise
    say(f"{what} ({time.monotonic() - started:.1f} s)")


def run(
    argv: Sequence[str | Path],
    log: Path,
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    capture: bool = False,
) -> str:
    """Run a one-shot command, its output appended to log; stdout returned when capture.

    Raises ImagesError with the log's tail when it fails.
    """
    args = [str(a) for a in argv]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"# {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
        out.flush()
        proc = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else out,
            stderr=out,
            env=None if env is None else {**os.environ, **env},
            cwd=cwd,
            check=False,
        )
    if proc.returncode != 0:
        raise ImagesError(
            f"{what} failed (exit {proc.returncode}): {' '.join(args)}\n"
            f"{log_tail(log)}\n(full log: {log})"
        )
    return proc.stdout.decode() if capture else ""


def _files_under(root: Path, entry: str) -> Iterator[Path]:
    path = root / entry
    if path.is_file():
        yield path
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_PARTS)
        for name in sorted(filenames):
            if not name.endswith(".pyc"):
                yield Path(dirpath, name)


def inputs_key(
    *, texts: Iterable[str] = (), root: Path | None = None, files: Iterable[str] = ()
) -> str:
    """sha256 (first KEY_LENGTH hex digits) of texts and of files/dirs under root, by relpath.

    Caches and editor droppings (`__pycache__`, `*.pyc`) are not inputs.
    """
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode() + b"\0")
    if root is not None:
        for entry in files:
            if not (root / entry).exists():
                raise ImagesError(f"image input missing: {root / entry}")
            for path in _files_under(root, entry):
                digest.update(path.relative_to(root).as_posix().encode() + b"\0")
                digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:KEY_LENGTH]


@dataclass(frozen=True)
class Buildah:
    """buildah with its own storage under the cache (never /var/lib/containers)."""

    binary: Path
    layout: Layout

    def argv(self, *args: str | Path) -> list[str]:
        return [
            str(self.binary),
            "--root",
            str(self.layout.buildah_root),
            "--runroot",
            str(self.layout.buildah_runroot),
            "--storage-driver",
            "overlay",
            *(str(a) for a in args),
        ]

    @property
    def env(self) -> dict[str, str]:
        # Temporary copies of layers go to the cache's tmp, not /var/tmp.
        return {"TMPDIR": str(self.layout.tmp)}

    def run(self, *args: str | Path, log: Path, what: str, capture: bool = False) -> str:
        return run(self.argv(*args), log, what=what, env=self.env, capture=capture)

    def has_image(self, name: str) -> bool:
        proc = subprocess.run(
            self.argv("inspect", "--type", "image", "--format", "{{.FromImageID}}", name),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env={**os.environ, **self.env},
            check=False,
        )
        return proc.returncode == 0
