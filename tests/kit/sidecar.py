"""The sidecar's fakes and builders: a reporter and a cache filler that record
what they are asked, published Bentos in plain directories (no mount), and
the whole sidecar run until it says Ready."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modelstore.publish import publish
from sidecar.env import Settings
from sidecar.run import run


@dataclass
class FakeReporter:
    """Records what the sidecar tells the cluster, in order (implements Reporter)."""

    said: list[tuple[str, ...]] = field(default_factory=list)

    async def event(self, kind: str, reason: str, message: str) -> None:
        self.said.append(("event", reason))

    async def set_condition(
        self, status: str, reason: str, message: str, attempts: int | None = 8
    ) -> None:
        self.said.append(("condition", status, reason))


@dataclass(frozen=True)
class PublishedBento:
    """A published Bento in a plain directory, standing in for the JuiceFS mount."""

    bento_dir: Path

    @property
    def models_dir(self) -> Path:
        return self.bento_dir / "models"


def published_bento(root: Path) -> PublishedBento:
    source = root / "src" / "models"
    (source / "llama3" / "v1").mkdir(parents=True)
    (source / "llama3" / "v1" / "model.yaml").write_text("name: llama3\n")
    (source / "llama3" / "v1" / "model.safetensors").write_bytes(os.urandom(3 << 20))
    volume = root / "volume"
    volume.mkdir()
    publish(source, volume, "/bentos/{name}/{version}", "llama3-service", "v1")
    return PublishedBento(volume / "bentos" / "llama3-service" / "v1")


def settings_for(bento: PublishedBento) -> Settings:
    return Settings.from_env(
        {
            "POD_NAME": "llama-0",
            "POD_NAMESPACE": "serving",
            "JFS_META_URL": "redis://unused",
            "BENTO_NAME": "llama3-service",
            "BENTO_VERSION": "v1",
            "JFS_BENTO_PATH": "/bentos/llama3-service/v1",
            "JFS_MOUNT_POINT": str(bento.bento_dir),
            "JFS_CACHE_DIR": str(bento.bento_dir.parent / "cache"),
            "JFS_CONDITION_TYPE": "juicefs.bentoml.com/models-ready",
            "JFS_WARMUP_TIMEOUT_SECONDS": "60",
            "JFS_AGENT_SOCKET": str(bento.bento_dir.parent / "agent.sock"),
        }
    )


def make_models(root: Path) -> Path:
    models = root / "models"
    (models / "llama3" / "v1").mkdir(parents=True)
    (models / "llama3" / "v1" / "model.yaml").write_text("name: llama3\n")
    (models / "llama3" / "v1" / "model-00002-of-00002.safetensors").write_bytes(os.urandom(3 << 20))
    (models / "llama3" / "v1" / "model-00001-of-00002.safetensors").write_bytes(os.urandom(5 << 20))
    (models / "llama3" / "latest").write_text("v1")
    (models / "tokenizer" / "t2").mkdir(parents=True)
    (models / "tokenizer" / "t2" / "vocab.json").write_text("{}")
    return models


@dataclass
class RecordingFiller:
    """Stands in for JuiceFSMount.fill_cache: records what it was asked to complete."""

    fail_with: BaseException | None = None
    hang: bool = False
    asked: list[list[Path]] = field(default_factory=list)

    async def fill_cache(self, paths: Sequence[Path]) -> None:
        self.asked.append(list(paths))
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail_with is not None:
            raise self.fail_with


@dataclass
class Recorder:
    """Stands in for AgentReporter: what the sidecar told the cluster, with when; stops on Ready."""

    stop: asyncio.Event | None = None
    said: list[tuple[float, str, str, str]] = field(default_factory=list)

    async def event(self, kind: str, reason: str, message: str) -> None:
        self.said.append((time.monotonic(), "event", reason, message))
        if reason == "Ready" and self.stop is not None:
            self.stop.set()

    async def set_condition(
        self, status: str, reason: str, message: str, attempts: int | None = 8
    ) -> None:
        self.said.append((time.monotonic(), "condition", f"{status}:{reason}", message))

    def reasons(self) -> list[str]:
        return [reason for _, _, reason, _ in self.said]

    def at(self, reason: str) -> float:
        return next(t for t, _, r, _ in self.said if r == reason)


def run_until_ready(settings: Settings, timeout: float = 600) -> tuple[int, Recorder]:
    """`sidecar.run.run` until it says Ready (then SIGTERM-like stop); its exit code."""

    async def scenario() -> tuple[int, Recorder]:
        stop = asyncio.Event()
        recorder = Recorder(stop)
        code = await asyncio.wait_for(run(settings, recorder, stop), timeout)
        return code, recorder

    return asyncio.run(scenario())
