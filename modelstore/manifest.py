"""The model layout in JuiceFS and its manifest.

    <bento path>/                   e.g. /bentos/llama3-service/v1
        manifest.json               written last: its presence means complete
        models/<model>/<version>/   BentoML's model store layout; what apps see

The manifest lists every file under models/ with its size, sha256 and load
order (the order the app reads them: small metadata first, then weights in
name order, which is shard order for safetensors/GGUF splits). The sidecar
streams files in that order and verifies each against it.

A manifest proves a pod's model only when it names the pod's Bento and
lists every model the pod chose (`files_to_verify`): one copied from
another Bento, carrying that Bento's hashes, or a selection that matches
nothing, is a `ManifestMismatch`, never an empty list of files verified.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

FORMAT = "bento-juicefs/v1"
MANIFEST_NAME = "manifest.json"
MODELS_DIR = "models"
# Files at or below this size are metadata (model.yaml, configs, tokenizers).
SMALL_FILE_BYTES = 1 << 20
HASH_CHUNK = 4 << 20


class VerificationError(Exception):
    """The model cannot be proven against the manifest: never open the gate on it."""


class ManifestMismatch(VerificationError):
    """The manifest does not describe the pod's model: another Bento's, or not the files chosen."""


def bento_tag(name: str, version: str) -> str:
    """The Bento as a manifest names it (`name:version`, as `publish` writes it)."""
    return f"{name}:{version}"


def _inside(path: str) -> str:
    # The sidecar runs as root: a manifest must never make it read outside models/.
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"file path {path!r} must be relative and stay inside models/")
    return path


class ManifestFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: Annotated[str, AfterValidator(_inside)]  # relative to models/
    model: str  # BentoML tag name:version
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    order: int = Field(ge=0)


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    format: str = FORMAT
    bento: str
    files: tuple[ManifestFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def models(self) -> tuple[str, ...]:
        """The model tags the manifest lists, sorted."""
        return tuple(sorted({f.model for f in self.files}))

    def select(self, models: tuple[str, ...]) -> list[ManifestFile]:
        """Files of the chosen models (all when none chosen), in load order.

        A model is chosen by its full tag or by name alone. A choice that
        matches no file is left out silently: verification goes through
        `files_to_verify`, which refuses that.
        """
        chosen = [f for f in self.files if not models or any(_chooses(m, f) for m in models)]
        return sorted(chosen, key=lambda f: f.order)

    def unmatched(self, models: tuple[str, ...]) -> tuple[str, ...]:
        """The chosen tags or names that match no file of the manifest, in the order given."""
        return tuple(m for m in models if not any(_chooses(m, f) for f in self.files))


def _chooses(model: str, entry: ManifestFile) -> bool:
    return entry.model == model or entry.model.split(":", 1)[0] == model


def files_to_verify(manifest: Manifest, bento: str, models: tuple[str, ...]) -> list[ManifestFile]:
    """The files that prove `bento`'s chosen `models`, in load order; ManifestMismatch if none can.

    Refused: a manifest that names another Bento (copied with its hashes, it
    would verify that Bento's bytes, not this one's), a manifest without
    files, and a choice of models of which any matches no file (a typo
    would otherwise verify the rest, or nothing, and open the gate).
    """
    if manifest.bento != bento:
        raise ManifestMismatch(
            f"{MANIFEST_NAME} names Bento {manifest.bento!r}, not this pod's {bento!r}: "
            "a manifest copied from another Bento proves nothing about this one"
        )
    if not manifest.files:
        raise ManifestMismatch(f"{MANIFEST_NAME} of {bento} lists no file: nothing to verify")
    unmatched = manifest.unmatched(models)
    if unmatched:
        raise ManifestMismatch(
            f"models {', '.join(unmatched)} (juicefs.bentoml.com/models) match no file of "
            f"{bento}'s {MANIFEST_NAME}, which has {', '.join(manifest.models)}"
        )
    return manifest.select(models)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _model_tag(relative: Path) -> str:
    parts = relative.parts
    return f"{parts[0]}:{parts[1]}" if len(parts) >= 3 else parts[0]


def load_order(files: list[tuple[Path, int]]) -> list[Path]:
    """Small files first (the app opens them before the weights), then by path."""
    return [
        p for p, _ in sorted(files, key=lambda item: (item[1] > SMALL_FILE_BYTES, str(item[0])))
    ]


def build_manifest(models_root: Path, bento: str) -> Manifest:
    found = [
        (p.relative_to(models_root), p.stat().st_size)
        for p in models_root.rglob("*")
        if p.is_file() and not p.is_symlink()
    ]
    entries = []
    for order, relative in enumerate(load_order(found)):
        path = models_root / relative
        entries.append(
            ManifestFile(
                path=relative.as_posix(),
                model=_model_tag(relative),
                size=path.stat().st_size,
                sha256=sha256_file(path),
                order=order,
            )
        )
    return Manifest(bento=bento, files=tuple(entries))


def read_manifest(bento_dir: Path) -> Manifest:
    return Manifest.model_validate_json((bento_dir / MANIFEST_NAME).read_bytes())
