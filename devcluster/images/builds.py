"""The three images: the project (injector, sidecar, node agent), the sample Bento, pause."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from devcluster.images import base, wheels
from devcluster.images.oci import cached_archive, export
from devcluster.images.steps import (
    Buildah,
    ImageArchive,
    Layout,
    inputs_key,
    run,
    say,
    step,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
BENTO_APP_DIR = REPO_ROOT / "examples" / "bento-app"
PAUSE_SOURCE = Path(__file__).with_name("pause.c")
JUICEFS_REQUIREMENTS = REPO_ROOT / "hack" / "binaries" / "juicefs" / "requirements.txt"
RUNTIME_LOCK = REPO_ROOT / "requirements" / "runtime.txt"  # `make lock`
BUILD_LOCK = REPO_ROOT / "requirements" / "build.txt"  # what builds the project's wheel

PROJECT_IMAGE = "ghcr.io/bentoml/bento-juicefs-sidecar:0.1.0"  # injector config's sidecar.image
SAMPLE_BENTO_IMAGE = (  # examples/bento-deployment.yaml's image
    "us-central1-docker.pkg.dev/acme-ml/bentos/llama3-8b-instruct:4fd7wxrbkcxfylg5"
)
PAUSE_IMAGE = "localhost/bento-juicefs/pause:3.10"

# Everything the project's Dockerfile reads from the repo.
PROJECT_INPUTS: tuple[str, ...] = (
    "Dockerfile",
    ".dockerignore",
    "pyproject.toml",
    "README.md",
    "requirements/runtime.txt",
    "hack/binaries/juicefs/requirements.txt",
    "common",
    "modelstore",
    "injector",
    "sidecar",
    "nodeagent",
)
BENTO_INPUTS: tuple[str, ...] = (
    "Dockerfile",
    "requirements.txt",
    "build-requirements.txt",
    "service.py",
    "bentofile.yaml",
)
PAUSE_CFLAGS: tuple[str, ...] = ("-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror")
WHEELHOUSE_MOUNT = "/wheelhouse"  # the Dockerfiles' ARG WHEELHOUSE default
# How every image is built; part of each image's inputs key, so a change here
# rebuilds. Reproducible: no layer cache (a step cached by an earlier build,
# made with other timestamps, would make the image differ from a fresh build's);
# every file's mtime and the image's created time fixed; SOURCE_DATE_EPOCH in
# the RUN steps, so the .pyc files pip compiles hold hashes of their sources,
# not the build's time. Offline: the wheelhouse is mounted, the base is local.
BUD_OPTIONS: tuple[str, ...] = (
    "--no-cache",
    "--force-rm",
    "--network",
    "none",
    "--pull=false",
    "--timestamp",
    str(base.SOURCE_DATE_EPOCH),
    "--build-arg",
    f"SOURCE_DATE_EPOCH={base.SOURCE_DATE_EPOCH}",
)


@dataclass
class Builder:
    """One ensure_images run: tools, the cache, and the base image once it is needed."""

    layout: Layout
    buildah: Buildah
    mmdebstrap: Path
    gcc: Path
    sources: list[str] = field(default_factory=base.apt_sources)
    _base: str | None = None

    @property
    def base_key(self) -> str:
        return base.base_key(self.sources)

    def base_image(self) -> str:
        if self._base is None:
            self._base = base.ensure_base(self.layout, self.buildah, self.mmdebstrap, self.sources)
        return self._base

    def bud(self, name: str, context: Path, wheelhouse: Path) -> None:
        """buildah bud of context/Dockerfile on the local base, offline, wheelhouse mounted."""
        base_image = self.base_image()
        with step(f"build {name} (buildah bud, base {base_image})"):
            self.buildah.run(
                "bud",
                *BUD_OPTIONS,
                "--build-arg",
                f"BASE={base_image}",
                "--volume",
                f"{wheelhouse}:{WHEELHOUSE_MOUNT}:ro",
                "--file",
                context / "Dockerfile",
                "--tag",
                name,
                context,
                log=self.layout.logs / f"build-{name.rsplit('/', 1)[-1].split(':')[0]}.log",
                what=f"buildah bud {name}",
            )

    def project(self, started: float) -> ImageArchive:
        wheel_inputs = [
            JUICEFS_REQUIREMENTS,
            RUNTIME_LOCK,
            BUILD_LOCK,
            REPO_ROOT / "pyproject.toml",
        ]
        key = inputs_key(
            texts=["project", self.base_key, *BUD_OPTIONS, *(p.read_text() for p in wheel_inputs)],
            root=REPO_ROOT,
            files=PROJECT_INPUTS,
        )
        if (cached := cached_archive(self.layout, PROJECT_IMAGE, key)) is not None:
            say(f"{PROJECT_IMAGE}: cached ({cached.path.name})")
            return cached
        house = wheels.ensure_wheelhouse(
            self.layout,
            "project",
            hashed_files=[JUICEFS_REQUIREMENTS, RUNTIME_LOCK, BUILD_LOCK],
            plain_files=[],
        )
        self.bud(PROJECT_IMAGE, REPO_ROOT, house)
        return export(self.buildah, self.layout, PROJECT_IMAGE, key, started)

    def sample_bento(self, started: float) -> ImageArchive:
        key = inputs_key(
            texts=["bento", self.base_key, *BUD_OPTIONS], root=BENTO_APP_DIR, files=BENTO_INPUTS
        )
        if (cached := cached_archive(self.layout, SAMPLE_BENTO_IMAGE, key)) is not None:
            say(f"{SAMPLE_BENTO_IMAGE}: cached ({cached.path.name})")
            return cached
        house = wheels.ensure_wheelhouse(
            self.layout,
            "bento",
            hashed_files=[],
            plain_files=[
                BENTO_APP_DIR / "requirements.txt",
                BENTO_APP_DIR / "build-requirements.txt",
            ],
        )
        self.bud(SAMPLE_BENTO_IMAGE, BENTO_APP_DIR, house)
        return export(self.buildah, self.layout, SAMPLE_BENTO_IMAGE, key, started)

    def pause(self, started: float) -> ImageArchive:
        log = self.layout.logs / "pause.log"
        compiler = run([self.gcc, "--version"], log, what="gcc", capture=True)
        key = inputs_key(
            texts=["pause", compiler.splitlines()[0], *PAUSE_CFLAGS, PAUSE_SOURCE.read_text()]
        )
        if (cached := cached_archive(self.layout, PAUSE_IMAGE, key)) is not None:
            say(f"{PAUSE_IMAGE}: cached ({cached.path.name})")
            return cached
        work = Path(tempfile.mkdtemp(prefix="pause-", dir=self.layout.tmp))
        try:
            with step(f"build {PAUSE_IMAGE} (gcc -static, buildah from scratch)"):
                binary = work / "pause"
                run([self.gcc, *PAUSE_CFLAGS, "-o", binary, PAUSE_SOURCE], log, what="gcc pause.c")
                config = ["--entrypoint", '["/pause"]', "--cmd", "[]", "--user", "65535:65535"]
                with base.from_scratch(self.buildah, PAUSE_IMAGE, log, config) as container:
                    self.buildah.run(
                        "copy", "--chmod", "0755", container, binary, "/pause", log=log, what="copy"
                    )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return export(self.buildah, self.layout, PAUSE_IMAGE, key, started)
