"""Sidecar pieces that need no mount: the manifest, publish, the streamer's logic.

The same code runs over a real JuiceFS FUSE mount in tests/storage.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from modelstore.manifest import Manifest, build_manifest, read_manifest
from modelstore.mount import split_meta_password
from modelstore.publish import PublishError, publish
from modelstore.streamer import Progress, Streamer, VerificationError, WarmupTimeout
from sidecar.cachedisk import measure
from sidecar.env import Settings, SettingsError
from tests.helpers import flip_middle_byte, minimal_env
from tests.kit.sidecar import make_models


def test_manifest_orders_metadata_first_then_shards(tmp_path: Path) -> None:
    manifest = build_manifest(make_models(tmp_path), "svc:1")
    paths = [f.path for f in sorted(manifest.files, key=lambda f: f.order)]
    assert paths[-2:] == [
        "llama3/v1/model-00001-of-00002.safetensors",
        "llama3/v1/model-00002-of-00002.safetensors",
    ]
    assert {f.model for f in manifest.files} == {"llama3:v1", "llama3", "tokenizer:t2"}
    assert manifest.total_bytes == sum(f.size for f in manifest.files)
    assert [f.path for f in manifest.select(("tokenizer",))] == ["tokenizer/t2/vocab.json"]


def test_publish_writes_manifest_last_and_refuses_republish(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    models = make_models(tmp_path / "src")
    manifest = publish(models, volume, "/bentos/{name}/{version}", "svc", "1")
    bento = volume / "bentos" / "svc" / "1"
    assert read_manifest(bento) == manifest
    assert (bento / "models" / "llama3" / "latest").read_text() == "v1"
    with pytest.raises(PublishError, match="immutable"):
        publish(models, volume, "/bentos/{name}/{version}", "svc", "1")
    with pytest.raises(PublishError, match="not a directory"):
        publish(tmp_path / "nope", volume, "/bentos/{name}/{version}", "svc", "2")


def streamer(
    root: Path, timeout: float = 30.0, **kwargs: object
) -> tuple[Streamer, list[Progress]]:
    seen: list[Progress] = []
    return (
        Streamer(
            root=root,
            concurrency=4,
            deadline=time.monotonic() + timeout,
            on_progress=seen.append,
            on_error=lambda p, e: None,
            range_bytes=1 << 20,
            **kwargs,  # type: ignore[arg-type]
        ),
        seen,
    )


def test_streamer_reads_everything_in_order_and_verifies(tmp_path: Path) -> None:
    models = make_models(tmp_path)
    manifest = build_manifest(models, "svc:1")
    files = manifest.select(())
    run, seen = streamer(models)
    progress = asyncio.run(run.run(files))
    assert progress.done_bytes == manifest.total_bytes
    assert progress.done_files == len(files)
    assert seen[-1].fraction == 1.0


def test_streamer_rejects_a_changed_byte(tmp_path: Path) -> None:
    models = make_models(tmp_path)
    files = build_manifest(models, "svc:1").select(())
    shard = models / "llama3" / "v1" / "model-00001-of-00002.safetensors"
    flip_middle_byte(shard)
    run, _ = streamer(models)
    with pytest.raises(VerificationError, match="sha256"):
        asyncio.run(run.run(files))


@pytest.mark.parametrize("change", [b"", b"extra"])
def test_streamer_rejects_a_wrong_size(tmp_path: Path, change: bytes) -> None:
    models = make_models(tmp_path)
    files = build_manifest(models, "svc:1").select(())
    shard = models / "llama3" / "v1" / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] if not change else data + change)
    run, _ = streamer(models)
    with pytest.raises(VerificationError, match="size differs"):
        asyncio.run(run.run(files))


def test_streamer_missing_file_and_deadline(tmp_path: Path) -> None:
    models = make_models(tmp_path)
    files = build_manifest(models, "svc:1").select(())
    (models / "tokenizer" / "t2" / "vocab.json").unlink()
    run, _ = streamer(models)
    with pytest.raises(VerificationError, match="missing"):
        asyncio.run(run.run(files))
    run, _ = streamer(models, timeout=-1)
    with pytest.raises(WarmupTimeout):
        asyncio.run(run.run([f for f in files if f.size > 1 << 20]))


def test_cache_probe_measures_a_real_directory(tmp_path: Path) -> None:
    speed = measure(tmp_path, size_mib=8)
    assert speed.write_mbps > 0
    assert speed.read_mbps > 0
    assert not list(tmp_path.iterdir()), "the probe file is removed"


def test_settings_name_the_missing_variable() -> None:
    with pytest.raises(SettingsError, match="POD_NAME"):
        Settings.from_env({})
    with pytest.raises(SettingsError, match="JFS_CACHE_SIZE_MIB='big'"):
        Settings.from_env(minimal_env(JFS_CACHE_SIZE_MIB="big"))


def test_manifest_round_trips_json(tmp_path: Path) -> None:
    manifest = build_manifest(make_models(tmp_path), "svc:1")
    assert Manifest.model_validate_json(manifest.model_dump_json()) == manifest


@pytest.mark.parametrize("path", ["/etc/shadow", "../../dev/sda", "a/../../b", "a//b", ""])
def test_manifest_paths_cannot_leave_models(path: str) -> None:
    entry = {"path": path, "model": "m", "size": 1, "sha256": "0" * 64, "order": 0}
    with pytest.raises(ValueError, match="inside models"):
        Manifest.model_validate({"bento": "b:1", "files": [entry]})


@pytest.mark.parametrize(
    ("url", "bare", "password"),
    [
        (
            "redis://jfs-reader:s3cr%40t@10.0.0.5:6379/1",
            "redis://jfs-reader@10.0.0.5:6379/1",
            "s3cr@t",
        ),
        ("redis://:onlypass@redis:6379/2", "redis://redis:6379/2", "onlypass"),
        ("redis://redis:6379/1", "redis://redis:6379/1", None),
        ("tikv://pd1:2379,pd2:2379/jfs", "tikv://pd1:2379,pd2:2379/jfs", None),
    ],
)
def test_the_metadata_password_leaves_the_command_line_for_the_env(
    url: str, bare: str, password: str | None
) -> None:
    assert split_meta_password(url) == (bare, password)
