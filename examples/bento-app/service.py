"""A sample Bento that loads its "model" from the Bento's models directory.

At start-up it reads every file under `<bento>/models` (BentoML's model store
layout, `<model>/<version>/...`), hashes each with sha256 and keeps the bytes.
`POST /predict` answers from those bytes, so a caller can prove the server saw
exactly the bytes that were published: the per-file sha256s, the byte count,
and an output hashed from the input text and every loaded byte.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import bentoml

MODELS_DIR_ENV = "BENTO_MODELS_DIR"


def models_dir() -> Path:
    """`$BENTO_MODELS_DIR`, else `models/` beside the Bento's `src/` (where the webhook mounts)."""
    override = os.environ.get(MODELS_DIR_ENV)
    if override:
        return Path(override)
    bento_path = os.environ.get("BENTO_PATH")
    if bento_path:
        return Path(bento_path) / "models"
    return Path(__file__).resolve().parent.parent / "models"


def load_models(root: Path) -> dict[str, bytes]:
    """Every regular file under root (symlinks followed), by path relative to root."""
    blobs: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file():
                blobs[path.relative_to(root).as_posix()] = path.read_bytes()
    return blobs


@bentoml.service(name="llama3-8b-instruct", traffic={"timeout": 60})
class Llama3Instruct:
    """Holds the loaded model files; every answer is computed from them."""

    def __init__(self) -> None:
        started = time.monotonic()
        self.root = models_dir()
        self.blobs = load_models(self.root)
        self.digests = {rel: hashlib.sha256(data).hexdigest() for rel, data in self.blobs.items()}
        self.total_bytes = sum(len(data) for data in self.blobs.values())
        self.load_seconds = time.monotonic() - started
        print(
            f"loaded {len(self.blobs)} model file(s), {self.total_bytes} bytes, "
            f"from {self.root} in {self.load_seconds:.3f} s",
            flush=True,
        )

    def _answer(self, text: str) -> dict[str, Any]:
        output = hashlib.sha256(text.encode())
        for rel in sorted(self.blobs):
            output.update(rel.encode() + b"\0" + self.blobs[rel])
        return {
            "models_dir": str(self.root),
            "files": self.digests,
            "total_bytes": self.total_bytes,
            "load_seconds": round(self.load_seconds, 3),
            "output": output.hexdigest(),
        }

    @bentoml.api
    def predict(self, text: str = "") -> dict[str, Any]:
        """sha256(text, then each loaded file's relpath, NUL, bytes, by relpath) and the digests."""
        return self._answer(text)
