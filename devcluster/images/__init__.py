"""Images for the local node, built without a registry or a Docker engine.

    archives = ensure_images()                 # pause, project, sample Bento
    import_images(ctr, "/run/.../containerd.sock", archives)

Everything lives under `${BENTO_JUICEFS_CACHE:-~/.cache/bento-juicefs}/images`,
keyed by the hash of each image's inputs, and is reused while the inputs are
unchanged (a cached run only hashes the inputs). Steps print one line each to
stderr with their seconds; command output goes to `images/logs/`.

- a Debian bookworm rootfs from mmdebstrap (the mirror apt uses here), imported
  into buildah (own storage under the cache) as `localhost/bento-juicefs-base`;
- the project image from the repo's Dockerfile, and the sample Bento from
  examples/bento-app/Dockerfile, both `buildah bud --network none` on that
  base with a host-downloaded wheelhouse mounted at /wheelhouse;
- a static `pause` (pause.c) in an image of its own for containerd's sandboxes;
- each exported with `buildah push IMAGE oci-archive:FILE:IMAGE`.

`python -m devcluster.images` builds them all and prints name, digest, size
and seconds.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from devcluster.images.builds import (
    BENTO_APP_DIR,
    PAUSE_IMAGE,
    PROJECT_IMAGE,
    SAMPLE_BENTO_IMAGE,
    Builder,
)
from devcluster.images.oci import containerd_images, import_images
from devcluster.images.steps import (
    Buildah,
    ImageArchive,
    ImagesError,
    Layout,
    default_cache_dir,
    say,
)
from devcluster.packages import ensure_packages

__all__ = [
    "BENTO_APP_DIR",
    "PAUSE_IMAGE",
    "PROJECT_IMAGE",
    "SAMPLE_BENTO_IMAGE",
    "ImageArchive",
    "ImagesError",
    "buildah_for",
    "containerd_images",
    "default_cache_dir",
    "ensure_images",
    "import_images",
    "run_in_image",
]

# Commands the builds use -> the Debian package that ships each.
TOOLS: dict[str, str] = {
    "buildah": "buildah",
    "mmdebstrap": "mmdebstrap",
    "runc": "runc",  # buildah's RUN steps
    "gcc": "gcc",
}


def buildah_for(cache_dir: Path | None = None) -> Buildah:
    """buildah bound to the images cache's own storage (installing it if needed)."""
    layout = Layout(cache_dir or default_cache_dir())
    layout.create()
    return Buildah(ensure_packages({"buildah": "buildah", "runc": "runc"})["buildah"], layout)


def ensure_images(cache_dir: Path | None = None) -> list[ImageArchive]:
    """The pause, project and sample Bento images as OCI archives, built if needed.

    cache_dir defaults to `${BENTO_JUICEFS_CACHE:-~/.cache/bento-juicefs}/images`.
    Needs root (apt for the tools, mmdebstrap, buildah's overlay storage).
    """
    layout = Layout(cache_dir or default_cache_dir())
    started = time.monotonic()
    with layout.locked():
        layout.create()
        tools = ensure_packages(TOOLS)
        builder = Builder(
            layout=layout,
            buildah=Buildah(tools["buildah"], layout),
            mmdebstrap=tools["mmdebstrap"],
            gcc=tools["gcc"],
        )
        archives = [
            builder.pause(time.monotonic()),
            builder.project(time.monotonic()),
            builder.sample_bento(time.monotonic()),
        ]
    say(f"{len(archives)} images ready in {time.monotonic() - started:.1f} s")
    return archives


def run_in_image(
    image: str,
    argv: Sequence[str],
    *,
    user: str | None = None,
    cache_dir: Path | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run argv in a throwaway container of a built image (`buildah run`, no network)."""
    tool = buildah_for(cache_dir)
    container = subprocess.run(
        tool.argv("from", "--pull=false", image),
        capture_output=True,
        text=True,
        env={**os.environ, **tool.env},
        check=False,
    )
    if container.returncode != 0:
        raise ImagesError(f"buildah from {image} failed: {container.stderr.strip()}")
    name = container.stdout.strip().splitlines()[-1]
    try:
        return subprocess.run(
            tool.argv(
                "run", "--network", "none", *(["--user", user] if user else []), name, "--", *argv
            ),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **tool.env},
            check=False,
        )
    finally:
        subprocess.run(tool.argv("rm", name), capture_output=True, check=False)
