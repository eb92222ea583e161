"""The model layout in JuiceFS and its manifest.

    <bento path>/                   e.g. /bentos/llama3-service/v1
        manifest.json               written last: its presence means complete
        models/<model>/<version>/   BentoML's model store layout; what apps see

The manifest lists every file under models/ with its size, sha256 and load
order (the order the app reads them: small metadata first, then weights in
name order, which is shard order for safetensors/GGUF splits). The sidecar
streams files in that order and verifies each against it.
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

    def select(self, models: tuple[str, ...]) -> list[ManifestFile]:
        """Files of the chosen models (all when none chosen), in load order.

        A model is chosen by its full tag or by name alone.
        """
        chosen = [
            f
            for f in self.files
            if not models or f.model in models or f.model.split(":", 1)[0] in models
        ]
        return sorted(chosen, key=lambda f: f.order)


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
