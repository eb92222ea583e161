"""`python -m sidecar publish`: put a Bento's models into JuiceFS in our layout.

Run by the Bento build pipeline (or by hand) with the JuiceFS volume mounted:
copies the models, then writes the manifest last, so a sidecar never sees a
manifest for files still being copied.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from modelstore.manifest import MANIFEST_NAME, MODELS_DIR, Manifest, build_manifest


class PublishError(Exception):
    pass


def bento_dir(volume_root: Path, path_template: str, name: str, version: str) -> Path:
    relative = path_template.format(name=name, version=version).lstrip("/")
    return volume_root / relative


def publish(
    source_models: Path, volume_root: Path, path_template: str, name: str, version: str
) -> Manifest:
    """Copy source_models (BentoML's models/ dir) under the Bento's path; write the manifest."""
    if not source_models.is_dir():
        raise PublishError(f"{source_models} is not a directory of BentoML models")
    if not volume_root.is_dir():
        raise PublishError(f"{volume_root} is not a mounted JuiceFS volume")
    target = bento_dir(volume_root, path_template, name, version)
    models = target / MODELS_DIR
    if (target / MANIFEST_NAME).exists():
        raise PublishError(f"{target} is already published; Bento versions are immutable")
    if models.exists():
        shutil.rmtree(models)  # an earlier publish that died before its manifest
    shutil.copytree(source_models, models, symlinks=False)
    manifest = build_manifest(models, f"{name}:{version}")
    fd, tmp = tempfile.mkstemp(dir=target, prefix=".manifest.")
    with os.fdopen(fd, "w") as handle:
        handle.write(manifest.model_dump_json(indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target / MANIFEST_NAME)
    return manifest
