"""The node's verified local copy: written while streaming, kept only once proven, served whole."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.warm import BentoRef, WarmRecord
from injector.config import InjectorConfig
from modelstore.localcopy import (
    CopiedFile,
    LocalCopy,
    parse_journal,
    parse_record,
    record_covers,
    render_record,
    resumable,
)
from modelstore.manifest import ManifestFile, VerificationError
from modelstore.streamer import CopyWriteError, Progress, stream_model
from nodeagent.warmer import copy_of, kept_copy, local_copy
from nodeagent.workloads import recorded_bento
from tests.kit.sidecar import PublishedBento

MIB = 1 << 20


def _entry(path: str, data: bytes, order: int = 0) -> ManifestFile:
    return ManifestFile(
        path=path,
        model="llm:v1",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        order=order,
    )


def _publish(root: Path, files: dict[str, bytes]) -> tuple[PublishedBento, list[ManifestFile]]:
    tree = PublishedBento(root)
    entries = []
    for order, (path, data) in enumerate(files.items()):
        target = tree.models_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        entries.append(_entry(path, data, order))
    return tree, entries


def _staged_files(copy: LocalCopy) -> list[Path]:
    return [p for p in (copy.root / "staging").rglob("*") if p.is_file()]


def _stream(
    tree: PublishedBento,
    files: list[ManifestFile],
    copy: LocalCopy,
    on_error: Callable[[Progress, BaseException], None] = lambda progress, err: None,
) -> None:
    asyncio.run(
        stream_model(
            2,
            tree,
            files,
            time.monotonic() + 30,
            on_progress=lambda progress: None,
            on_error=on_error,
            copy=copy,
        )
    )


def test_what_was_streamed_and_proven_is_the_copy(tmp_path: Path) -> None:
    data = {"llm/v1/model.yaml": b"name: llm\n", "llm/v1/weights.bin": bytes(range(256)) * 40_000}
    tree, files = _publish(tmp_path / "bento", data)
    copy = LocalCopy(tmp_path / "copy")
    _stream(tree, files, copy)
    for path, content in data.items():
        assert (copy.models_dir / path).read_bytes() == content
    assert _staged_files(copy) == []
    assert not copy.covers(files), "not a copy until it is recorded"
    copy.seal(files)
    assert copy.covers(files)
    # The file on disk changed behind the record's back (truncated): not served.
    (copy.models_dir / "llm/v1/weights.bin").write_bytes(b"short")
    assert not copy.covers(files)
    copy.remove()
    assert not copy.root.exists()


def test_a_file_that_differs_from_the_manifest_leaves_no_trace(tmp_path: Path) -> None:
    tree, files = _publish(tmp_path / "bento", {"a.bin": b"a" * 1000, "b.bin": b"b" * 1000})
    lying = files[1].model_copy(update={"sha256": "0" * 64})
    copy = LocalCopy(tmp_path / "copy")
    with pytest.raises(VerificationError, match=r"b\.bin: sha256"):
        _stream(tree, [files[0], lying], copy)
    assert not (copy.models_dir / "b.bin").exists()
    # Nothing of the file that failed is kept, not even staged to resume from.
    assert not (copy.root / "staging" / "b.bin").exists()


def test_writing_the_copy_again_drops_its_record_and_stages_out_of_view(tmp_path: Path) -> None:
    tree, files = _publish(tmp_path / "bento", {"a.bin": b"a" * 10, "b.bin": b"b" * 10})
    copy = LocalCopy(tmp_path / "copy")
    _stream(tree, files, copy)
    copy.seal(files)
    (copy.models_dir / "b.bin").unlink()  # the seal found it short: warmed again
    copy.begin()
    assert not copy.covers(files)
    # A pod still bound to models/ sees whole files only, never one being written.
    fd, _ = copy.open(files[1], 4)
    try:
        assert sorted(p.name for p in copy.models_dir.iterdir()) == ["a.bin"]
    finally:
        copy.drop(files[1], fd)
    _stream(tree, files, copy)
    copy.seal(files)
    assert copy.covers(files)
    assert _staged_files(copy) == []


def test_a_warm_resumed_streams_only_what_was_not_proven_and_kept(tmp_path: Path) -> None:
    data = {"a.bin": b"a" * 100, "b.bin": b"b" * 100, "c.bin": b"c" * 100}
    tree, files = _publish(tmp_path / "bento", data)
    copy = LocalCopy(tmp_path / "copy")
    _stream(tree, files[:2], copy)  # the agent stopped after two files
    assert copy.proven(files) == files[:2]
    (copy.models_dir / "b.bin").write_bytes(b"b")  # changed on disk since: streamed again
    assert copy.proven(files) == files[:1]
    other = files[0].model_copy(update={"sha256": "1" * 64})  # another manifest's a.bin
    assert copy.proven([other]) == []
    with (copy.root / "kept.jsonl").open("a") as journal:
        journal.write('{"path": "c.bin", "si')  # torn as the agent was killed
    assert copy.proven(files) == files[:1]
    assert LocalCopy(tmp_path / "none").proven(files) == []
    assert parse_journal('{"path":"a","size":1,"sha256":"x"}\nnot json\n') == {
        "a": CopiedFile(1, "x")
    }


def test_a_file_resumes_from_the_whole_ranges_an_earlier_warm_wrote(tmp_path: Path) -> None:
    """The published file's first range is garbage here: the copy still verifies, so that
    range came from the staged file, not through the mount again."""
    content = bytes(range(256)) * (5 * MIB // 256)
    tree, [entry] = _publish(tmp_path / "bento", {"w.bin": content})
    (tree.models_dir / "w.bin").write_bytes(b"\0" * (4 * MIB) + content[4 * MIB :])
    copy = LocalCopy(tmp_path / "copy")
    staged = copy.root / "staging" / "w.bin"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(content[: 4 * MIB + 1000])  # the agent stopped mid-range
    _stream(tree, [entry], copy)
    assert (copy.models_dir / "w.bin").read_bytes() == content
    assert _staged_files(copy) == []


class _UnwritableCopy(LocalCopy):
    """A copy whose files cannot be written (as on a full disk)."""

    def open(self, entry: ManifestFile, range_bytes: int) -> tuple[int, int]:
        fd, resumed = super().open(entry, range_bytes)
        os.close(fd)
        return os.open(self._staged(entry), os.O_RDONLY), resumed


def test_a_copy_that_cannot_be_written_ends_the_warm_at_once(tmp_path: Path) -> None:
    """Not retried as a failed read through FUSE would be, until the deadline."""
    tree, files = _publish(tmp_path / "bento", {"a.bin": b"a" * 1000})
    copy = _UnwritableCopy(tmp_path / "copy")
    retried: list[BaseException] = []
    with pytest.raises(CopyWriteError, match="writing the local copy"):
        _stream(tree, files, copy, on_error=lambda progress, err: retried.append(err))
    assert retried == []
    assert not (copy.models_dir / "a.bin").exists()


def test_a_resumed_file_that_does_not_verify_is_read_again_whole(tmp_path: Path) -> None:
    """A stopped warm's staged bytes are kept unproven: when the file they begin does not
    match the manifest, it is read once more from its start, not failed."""
    content = bytes(range(256)) * (5 * MIB // 256)
    tree, [entry] = _publish(tmp_path / "bento", {"w.bin": content})
    copy = LocalCopy(tmp_path / "copy")
    staged = copy.root / "staging" / "w.bin"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"\0" * (4 * MIB))  # what a dying mount may have handed over
    _stream(tree, [entry], copy)
    assert (copy.models_dir / "w.bin").read_bytes() == content
    assert _staged_files(copy) == []


def test_what_is_resumed_is_whole_ranges_within_the_file() -> None:
    assert resumable(0, 100, 10) == 0
    assert resumable(35, 100, 10) == 30
    assert resumable(100, 100, 10) == 100
    assert resumable(150, 100, 10) == 100  # never past the manifest's size
    assert resumable(150, 95, 10) == 90


def test_a_record_covers_files_only_as_the_manifest_and_the_disk_say() -> None:
    entry = _entry("a.bin", b"abc")
    recorded = {"a.bin": CopiedFile(3, entry.sha256)}
    assert record_covers(recorded, [entry], {"a.bin": 3})
    assert not record_covers(recorded, [entry], {})  # missing, or not a regular file
    assert not record_covers(recorded, [entry], {"a.bin": 2})
    assert not record_covers({"a.bin": CopiedFile(3, "0" * 64)}, [entry], {"a.bin": 3})
    assert not record_covers({}, [entry], {"a.bin": 3})
    assert parse_record(render_record([entry])) == recorded
    with pytest.raises(ValueError, match="not a list"):
        parse_record("{}")


def test_the_copy_is_kept_under_the_node_cache_only_when_configured(tmp_path: Path) -> None:
    ref = BentoRef("models", "llm", "v1")
    on = InjectorConfig.model_validate({"cache": {"nodePath": str(tmp_path)}})
    off = InjectorConfig.model_validate({"cache": {"nodePath": str(tmp_path), "localCopy": False}})
    copy = local_copy(on, ref)
    assert copy is not None
    assert copy.root == tmp_path / ".local-copies" / "models" / "llm" / "v1"
    assert local_copy(off, ref) is None
    assert copy_of(off, ref) == copy  # eviction still finds one kept before

    # Only a warm of every model keeps a copy (served whole as models/), in place of
    # node cache blocks; a warm of some models keeps blocks, as with the copy off.
    assert kept_copy(on, recorded_bento(ref, (), on)) == copy
    assert kept_copy(on, recorded_bento(ref, ("llm",), on)) is None
    assert kept_copy(off, recorded_bento(ref, (), off)) is None


def test_the_agent_serves_a_copy_only_of_every_model_warm_and_recorded(tmp_path: Path) -> None:
    from nodeagent.agent import AgentOptions, NodeAgent
    from nodeagent.warmer import AgentIdentity

    ref = BentoRef("models", "llm", "v1")
    config = InjectorConfig.model_validate({"cache": {"nodePath": str(tmp_path)}})
    options = AgentOptions(credentials_dir=tmp_path, work_dir=tmp_path)
    agent = NodeAgent(config, options, AgentIdentity("n1", "a", "ns"), api=None)  # type: ignore[arg-type]
    copy = local_copy(config, ref)
    assert copy is not None
    tree, files = _publish(tmp_path / "bento", {"a.bin": b"a" * 10})
    _stream(tree, files, copy)
    copy.seal(files)

    def warm(models: tuple[str, ...], state: str = "warm") -> None:
        record = WarmRecord(ref, state, 20, verified=True, models=models)  # type: ignore[arg-type]
        agent.warmth.records[ref] = record

    assert agent.served_copy(ref, ()) is None  # no record: not sealed on this node
    warm(())
    assert agent.served_copy(ref, ()) == copy.models_dir
    assert agent.served_copy(ref, ("llm",)) == copy.models_dir
    warm(("llm",))  # a copy of some models is not models/
    assert agent.served_copy(ref, ("llm",)) is None
    warm((), "warming")
    assert agent.served_copy(ref, ()) is None
    warm(())
    copy.record_path.unlink()
    assert agent.served_copy(ref, ()) is None


def test_the_startup_probe_sees_the_models_from_fuse_or_the_agents_read_only_copy() -> None:
    from common.mounts import Mount, parse_mountinfo
    from modelstore.mountcheck import models_shown

    point = Path("/var/lib/juicefs/mnt")
    volume = Mount(point, "ext4", "/dev/sda1")  # the kubelet's bind of the pod's emptyDir
    juicefs = Mount(point, "fuse.juicefs", "JuiceFS:models", read_only=True)
    copy = Mount(point, "ext4", "/dev/sda1", read_only=True)
    assert not models_shown([])
    assert not models_shown([volume])  # the volume alone: nothing mounted on it yet
    assert models_shown([volume, juicefs])
    assert models_shown([volume, copy])
    assert models_shown([volume, copy, juicefs])  # remounted over the copy
    assert not models_shown([copy])  # read-only, but not over the pod's volume
    assert not models_shown([volume, Mount(point, "ext4", "/dev/sda1")])

    line = (
        "1182 1170 8:1 /var/lib/bento-juicefs/.local-copies/models/llm/v1/models "
        "/var/lib/juicefs/mnt ro,nosuid,nodev,noexec,relatime master:50 - ext4 /dev/sda1 rw"
    )
    [parsed] = parse_mountinfo(line)
    assert parsed == Mount(point, "ext4", "/dev/sda1", read_only=True)
    [writable] = parse_mountinfo(line.replace(" ro,nosuid", " rw,nosuid"))
    assert not writable.read_only


def test_prefetch_reads_a_copy_into_the_page_cache_and_skips_what_it_cannot_open(
    tmp_path: Path,
) -> None:
    from modelstore.localcopy import prefetch

    models = tmp_path / "models"
    (models / "llm" / "v1").mkdir(parents=True)
    (models / "llm" / "v1" / "weights.bin").write_bytes(b"w" * 4096)
    (models / "llm" / "latest").symlink_to("v1")  # not followed, not a file to read
    prefetch(models)  # advice: it returns, whatever the kernel makes of it
    prefetch(tmp_path / "gone")  # a copy removed meanwhile: nothing to do


def test_the_sealed_condition_says_what_the_app_reads() -> None:
    from nodeagent.servedpods import sealed_message

    copy = sealed_message("llm:v1 (models)", 0.42, copy_served=True)
    assert copy == (
        "llm:v1 (models): verified once on this node by the node agent, its verified copy on "
        "the node's disk (checked in 0.4s); the app reads that copy, not FUSE"
    )
    blocks = sealed_message("llm:v1 (models)", 2.0, copy_served=False)
    assert "every block in the node cache (checked in 2.0s)" in blocks
    assert "copy" not in blocks


def test_a_sealed_copy_keeps_the_manifest_it_was_proved_against(tmp_path: Path) -> None:
    """So that a seal on a warm node reads it there, without mounting JuiceFS."""
    from modelstore.manifest import Manifest

    tree, files = _publish(tmp_path / "bento", {"llm/v1/w.bin": b"w" * 100})
    manifest = Manifest(format="bento-juicefs/v1", bento="llama:v1", files=tuple(files))
    copy = LocalCopy(tmp_path / "copy")
    _stream(tree, files, copy)
    assert copy.manifest() is None
    copy.seal(files, manifest)
    assert copy.manifest() == manifest
    (copy.root / "manifest.json").write_text("{not json")
    assert copy.manifest() is None  # unreadable: read from JuiceFS instead


def test_a_cold_seal_of_every_model_mounts_only_to_warm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod of every model names no model to check against the manifest first: its cold
    seal goes straight to the warm (one JuiceFS mount, the warm's own); a pod that
    selects models has its selection checked through a mount before anything is warmed."""
    from nodeagent.agent import AgentOptions, NodeAgent
    from nodeagent.warmer import AgentIdentity

    ref = BentoRef("models", "llm", "v1")
    config = InjectorConfig.model_validate(
        {"cache": {"nodePath": str(tmp_path), "localCopy": False}}
    )
    options = AgentOptions(credentials_dir=tmp_path, work_dir=tmp_path)
    agent = NodeAgent(config, options, AgentIdentity("n1", "a", "ns"), api=None)  # type: ignore[arg-type]
    mounts: list[tuple[str, ...]] = []

    class Refused(Exception):
        pass

    def mounted(want: Any, blocks: bool = True) -> Any:
        mounts.append(want.models)
        raise Refused  # what follows the check is not this test's

    warmed: list[tuple[str, ...]] = []

    async def warm(want: Any, referenced: set[BentoRef]) -> None:
        warmed.append(want.models)

    monkeypatch.setattr(agent, "_mounted", mounted)
    monkeypatch.setattr(agent, "warm", warm)
    why = asyncio.run(agent.seal(ref, ()))
    assert mounts == []
    assert warmed == [()]
    assert why is not None  # nothing recorded by the stand-in warm: not sealed
    with pytest.raises(Refused):
        asyncio.run(agent.seal(ref, ("llm:v1",)))
    assert mounts == [("llm:v1",)]
    assert warmed == [()]
