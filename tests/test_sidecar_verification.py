"""Verification trusts nothing a tenant can write (modelstore.manifest and .streamer, sidecar.run).

- The manifest must name the pod's Bento: one copied from another Bento,
  with that Bento's hashes, verifies nothing.
- An empty or partial choice of models never opens the gate, nor does a
  manifest without files.
- A file whose bytes differ from the manifest has its cached blocks evicted
  (where the cache is this client's to change) and is read once more; only
  a second mismatch fails.

The same over a real JuiceFS mount with a corrupted cached block:
tests/storage/test_juicefs_sidecar.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.warm import BentoRef
from injector.config import Warmup
from modelstore.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestFile,
    ManifestMismatch,
    bento_tag,
    build_manifest,
    files_to_verify,
    read_manifest,
)
from modelstore.mount import JuiceFSMount, MountError
from modelstore.publish import publish
from modelstore.streamer import Progress, Streamer, VerificationError, content_problem, stream_model
from nodeagent.warmer import MountedBento
from nodeagent.workloads import WantedBento
from sidecar.decisions import CachePlan, gate_plan
from sidecar.env import Settings
from sidecar.gate import open_gate
from tests.helpers import flip_middle_byte
from tests.kit.sidecar import PublishedBento, make_models, published_bento, settings_for

SHA = "0" * 64
BENTO = "llama3-service:v1"
VERIFY = gate_plan(True, CachePlan(18432))


def entry(path: str, model: str, order: int, size: int = 1) -> ManifestFile:
    return ManifestFile(path=path, model=model, size=size, sha256=SHA, order=order)


MANIFEST = Manifest(
    bento=BENTO,
    files=(
        entry("llama3/v1/model-2.safetensors", "llama3:v1", 3),
        entry("llama3/v1/model.yaml", "llama3:v1", 0),
        entry("llama3/latest", "llama3", 1),
        entry("tokenizer/t2/vocab.json", "tokenizer:t2", 2),
    ),
)


def replace_bento(manifest: Manifest, bento: str) -> Manifest:
    return Manifest(bento=bento, files=manifest.files)


# -- the manifest must name the pod's Bento and have what the pod chose ------------------


def test_the_manifest_of_the_pods_bento_gives_the_chosen_files_in_load_order() -> None:
    assert [f.order for f in files_to_verify(MANIFEST, BENTO, ())] == [0, 1, 2, 3]
    by_name = files_to_verify(MANIFEST, BENTO, ("llama3",))
    assert [f.path for f in by_name] == [
        "llama3/v1/model.yaml",
        "llama3/latest",
        "llama3/v1/model-2.safetensors",
    ]
    by_tag = files_to_verify(MANIFEST, BENTO, ("tokenizer:t2", "llama3:v1"))
    assert [f.order for f in by_tag] == [0, 2, 3]


@pytest.mark.parametrize("bento", ["other-service:v1", "llama3-service:v2", "llama3-service", ""])
def test_a_manifest_naming_another_bento_is_refused_naming_both(bento: str) -> None:
    copied = replace_bento(MANIFEST, bento)
    with pytest.raises(ManifestMismatch) as refused:
        files_to_verify(copied, BENTO, ())
    message = str(refused.value)
    assert f"names Bento {bento!r}, not this pod's {BENTO!r}" in message
    assert message.startswith(MANIFEST_NAME)


def test_a_manifest_without_files_is_refused() -> None:
    empty = Manifest(bento=BENTO, files=())
    for models in ((), ("llama3",)):
        with pytest.raises(ManifestMismatch, match="lists no file: nothing to verify"):
            files_to_verify(empty, BENTO, models)


@pytest.mark.parametrize(
    ("models", "unmatched"),
    [
        (("llama4",), "llama4"),
        # A partial choice: llama3 alone would verify, and the pod would miss its tokenizer.
        (("llama3", "tokenizr"), "tokenizr"),
        (("llama3:v2", "tokenizer:t2"), "llama3:v2"),
        (("llama", "v1", "llama3:v1"), "llama, v1"),  # no prefix or version match
    ],
)
def test_a_model_the_manifest_lacks_is_refused_naming_it_and_what_the_manifest_has(
    models: tuple[str, ...], unmatched: str
) -> None:
    assert MANIFEST.unmatched(models) == tuple(unmatched.split(", "))
    with pytest.raises(ManifestMismatch) as refused:
        files_to_verify(MANIFEST, BENTO, models)
    assert str(refused.value) == (
        f"models {unmatched} (juicefs.bentoml.com/models) match no file of {BENTO}'s "
        "manifest.json, which has llama3, llama3:v1, tokenizer:t2"
    )


def test_select_alone_leaves_an_unknown_model_out_silently() -> None:
    """Why verification goes through files_to_verify, never select() alone."""
    assert MANIFEST.select(("llama3", "tokenizr")) == MANIFEST.select(("llama3",))
    assert MANIFEST.select(("llama4",)) == []


TAGS = st.sampled_from(["a:1", "a:2", "a", "b:1", "c"])


@given(
    tags=st.lists(TAGS, max_size=6),
    chosen=st.lists(st.sampled_from(["a:1", "a:2", "a", "b:1", "b", "c", "d"]), max_size=3),
    bento=st.sampled_from([BENTO, "other:v1"]),
)
def test_whatever_the_manifest_and_the_choice_no_empty_or_partial_selection_verifies(
    tags: list[str], chosen: list[str], bento: str
) -> None:
    manifest = Manifest(
        bento=bento,
        files=tuple(entry(f"{t.replace(':', '/')}/f{i}", t, i) for i, t in enumerate(tags)),
    )
    models = tuple(chosen)
    try:
        files = files_to_verify(manifest, BENTO, models)
    except ManifestMismatch:
        chosen_all = all(any(t == m or t.split(":")[0] == m for t in tags) for m in models)
        assert bento != BENTO or not tags or not chosen_all
        return
    assert files, "never an empty list of files to verify"
    assert bento == BENTO
    for model in models:  # every model chosen has its files among them
        assert any(f.model == model or f.model.split(":")[0] == model for f in files)


def test_the_bento_tag_is_what_publish_writes(tmp_path: Path) -> None:
    bento = published_bento(tmp_path)
    assert read_manifest(bento.bento_dir).bento == bento_tag("llama3-service", "v1")


# -- what the bytes read say ---------------------------------------------------------------


def test_content_problem() -> None:
    listed = ManifestFile(path="m/v/w", model="m:v", size=10, sha256="a" * 64, order=0)
    assert content_problem(listed, 10, False, "a" * 64) is None
    assert content_problem(listed, 9, False, "a" * 64) == (
        "m/v/w: size differs from the manifest (10 bytes expected)"
    )
    assert "size differs" in (content_problem(listed, 10, True, "a" * 64) or "")
    assert content_problem(listed, 10, False, "b" * 64) == (
        f"m/v/w: sha256 {'b' * 64} differs from the manifest's {'a' * 64}"
    )


# -- a mismatch purges the file's cached blocks, then reads it once more -----------------


@dataclass
class FakePurge:
    """Stands in for evicting a file's cached blocks: `fix` puts the listed bytes back."""

    fix: Callable[[ManifestFile], object] | None = None
    fails: str | None = None
    asked: list[tuple[str, str]] = field(default_factory=list)

    async def __call__(self, entry: ManifestFile, problem: str) -> str | None:
        self.asked.append((entry.path, problem))
        if self.fix is not None:
            self.fix(entry)
        return self.fails


SHARD = "llama3/v1/model-00001-of-00002.safetensors"


def corrupted_models(root: Path) -> tuple[Path, Manifest, bytes]:
    """A model whose largest shard has one byte flipped after the manifest was built."""
    models = make_models(root)
    manifest = build_manifest(models, "svc:1")
    good = (models / SHARD).read_bytes()
    flip_middle_byte(models / SHARD)
    return models, manifest, good


def streamer(root: Path, purge: FakePurge | None) -> tuple[Streamer, list[int]]:
    done: list[int] = []

    def on_progress(progress: Progress) -> None:
        done.append(progress.done_bytes)

    return (
        Streamer(
            root=root,
            concurrency=2,
            deadline=time.monotonic() + 30,
            on_progress=on_progress,
            on_error=lambda p, e: None,
            range_bytes=1 << 20,
            purge=purge,
        ),
        done,
    )


def test_a_mismatch_purges_and_a_good_second_read_verifies(tmp_path: Path) -> None:
    models, manifest, good = corrupted_models(tmp_path)
    purge = FakePurge(fix=lambda e: (models / e.path).write_bytes(good))
    run, done = streamer(models, purge)
    progress = asyncio.run(run.run(manifest.select(())))
    assert [path for path, _ in purge.asked] == [SHARD]
    assert purge.asked[0][1].startswith(f"{SHARD}: sha256 ")
    assert progress.done_files == len(manifest.files)
    # The second read counts no byte twice: progress never goes back, nor past the model.
    assert progress.done_bytes == manifest.total_bytes
    assert done == sorted(done)
    assert max(done) == manifest.total_bytes


def test_a_second_mismatch_fails_saying_it_was_read_again(tmp_path: Path) -> None:
    models, manifest, _ = corrupted_models(tmp_path)
    purge = FakePurge()  # evicting changed nothing: the object store itself holds other bytes
    run, _ = streamer(models, purge)
    with pytest.raises(VerificationError) as failed:
        asyncio.run(run.run(manifest.select(())))
    assert [path for path, _ in purge.asked] == [SHARD], "purged once, read twice, no more"
    assert str(failed.value).startswith(f"{SHARD}: sha256 ")
    assert str(failed.value).endswith("(read again after evicting its cached blocks)")


def test_a_purge_that_failed_still_reads_once_more_and_says_so(tmp_path: Path) -> None:
    models, manifest, good = corrupted_models(tmp_path)
    run, _ = streamer(models, FakePurge(fails="juicefs warmup --evict exited with code 1"))
    with pytest.raises(VerificationError, match=r"evicting its cached blocks failed: juicefs"):
        asyncio.run(run.run(manifest.select(())))
    # A failed purge with a good second read (a bad read in flight, not on disk) verifies.
    purge = FakePurge(fix=lambda e: (models / e.path).write_bytes(good), fails="timed out")
    run, _ = streamer(models, purge)
    assert asyncio.run(run.run(manifest.select(()))).done_files == len(manifest.files)


def test_a_wrong_size_is_purged_too_but_a_missing_file_is_not(tmp_path: Path) -> None:
    models = make_models(tmp_path)
    manifest = build_manifest(models, "svc:1")
    good = (models / SHARD).read_bytes()
    (models / SHARD).write_bytes(good[:-1])
    purge = FakePurge(fix=lambda e: (models / e.path).write_bytes(good))
    run, _ = streamer(models, purge)
    assert asyncio.run(run.run(manifest.select(()))).done_files == len(manifest.files)
    assert [path for path, _ in purge.asked] == [SHARD]

    (models / SHARD).unlink()
    purge = FakePurge()
    run, _ = streamer(models, purge)
    with pytest.raises(VerificationError, match="listed in the manifest but missing"):
        asyncio.run(run.run(manifest.select(())))
    assert purge.asked == []


def test_without_purge_the_first_mismatch_fails(tmp_path: Path) -> None:
    models, manifest, _ = corrupted_models(tmp_path)
    run, _ = streamer(models, None)
    with pytest.raises(VerificationError, match=r"sha256 .* differs from the manifest's \w+$"):
        asyncio.run(run.run(manifest.select(())))


def test_stream_model_refuses_to_verify_nothing(tmp_path: Path) -> None:
    bento = published_bento(tmp_path)
    with pytest.raises(VerificationError, match="nothing to verify"):
        asyncio.run(
            stream_model(
                settings_for(bento).warmup_concurrency,
                bento,
                [],
                time.monotonic() + 30,
                on_progress=lambda p: None,
                on_error=lambda p, e: None,
            )
        )


# -- the gate, through open_gate -----------------------------------------------------------


@dataclass
class Reporter:
    """Records Events and conditions with their messages (implements sidecar.reporter.Reporter)."""

    said: list[tuple[str, str, str]] = field(default_factory=list)

    async def event(self, kind: str, reason: str, message: str) -> None:
        self.said.append(("event", reason, message))

    async def set_condition(
        self, status: str, reason: str, message: str, attempts: int | None = 8
    ) -> None:
        self.said.append((f"condition {status}", reason, message))

    @property
    def reasons(self) -> list[tuple[str, str]]:
        return [(what, reason) for what, reason, _ in self.said]

    def message(self, reason: str) -> str:
        return next(m for what, r, m in self.said if r == reason and what == "event")


@dataclass
class RecordingPurger:
    """Stands in for JuiceFSMount.evict_cache; `fix` puts the listed bytes back."""

    fix: Callable[[Sequence[Path]], object] | None = None
    fail_with: BaseException | None = None
    asked: list[list[Path]] = field(default_factory=list)

    async def evict_cache(self, paths: Sequence[Path]) -> None:
        self.asked.append(list(paths))
        if self.fix is not None:
            self.fix(paths)
        if self.fail_with is not None:
            raise self.fail_with


def rewrite_manifest(target: PublishedBento, **changes: object) -> None:
    path = target.bento_dir / MANIFEST_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def replaced_by_another_bento(target: PublishedBento, root: Path) -> None:
    """Another Bento's models and manifest where target's were: every hash of it holds."""
    source = root / "other-src" / "models"
    (source / "mistral" / "v7").mkdir(parents=True)
    (source / "mistral" / "v7" / "weights.bin").write_bytes(os.urandom(2 << 20))
    volume = target.bento_dir.parents[2]
    publish(source, volume, "/bentos/{name}/{version}", "other-service", "v3")
    other = volume / "bentos" / "other-service" / "v3"
    shutil.rmtree(target.models_dir)
    shutil.copytree(other / "models", target.models_dir)
    shutil.copy(other / MANIFEST_NAME, target.bento_dir / MANIFEST_NAME)


def gate(bento: PublishedBento, models: tuple[str, ...] = (), **kwargs: object) -> Reporter:
    reporter = Reporter()
    settings = replace(settings_for(bento), models=models)
    asyncio.run(open_gate(settings, bento, reporter, VERIFY, **kwargs))  # type: ignore[arg-type]
    return reporter


def assert_shut(reporter: Reporter) -> None:
    assert ("condition False", "VerificationFailed") in reporter.reasons
    assert not any(what == "condition True" for what, _ in reporter.reasons)
    assert ("event", "Ready") not in reporter.reasons


def test_a_manifest_copied_from_another_bento_keeps_the_gate_shut(tmp_path: Path) -> None:
    bento = published_bento(tmp_path)
    replaced_by_another_bento(bento, tmp_path)
    copied = read_manifest(bento.bento_dir)
    # The bytes are the other Bento's, and its manifest's hashes hold for every one of them.
    run, _ = streamer(bento.models_dir, None)
    assert asyncio.run(run.run(copied.select(()))).done_files == len(copied.files)

    reporter = gate(bento)
    assert reporter.reasons == [
        ("event", "VerificationFailed"),
        ("condition False", "VerificationFailed"),
    ]
    message = reporter.message("VerificationFailed")
    assert message.startswith("the manifest cannot prove this pod's model: manifest.json names")
    assert "'other-service:v3'" in message
    assert "'llama3-service:v1'" in message
    condition = reporter.said[-1][2]
    assert "'other-service:v3'" in condition
    assert "'llama3-service:v1'" in condition


@pytest.mark.parametrize(
    ("models", "named"),
    [
        (("llama4",), "llama4"),
        (("llama3", "tokenizer"), "tokenizer"),
        (("llama3:v2",), "llama3:v2"),
    ],
)
def test_a_choice_of_models_the_bento_lacks_keeps_the_gate_shut(
    tmp_path: Path, models: tuple[str, ...], named: str
) -> None:
    reporter = gate(published_bento(tmp_path), models)
    assert_shut(reporter)
    assert "WarmupStarted" not in {r for _, r in reporter.reasons}, "nothing is streamed"
    message = reporter.message("VerificationFailed")
    assert f"models {named} (juicefs.bentoml.com/models) match no file of" in message
    assert message.endswith("which has llama3:v1")


def test_a_manifest_without_files_keeps_the_gate_shut(tmp_path: Path) -> None:
    bento = published_bento(tmp_path)
    rewrite_manifest(bento, files=[])
    reporter = gate(bento)
    assert_shut(reporter)
    assert "lists no file: nothing to verify" in reporter.message("VerificationFailed")


def test_choosing_the_bentos_model_by_name_or_tag_opens_the_gate(tmp_path: Path) -> None:
    bento = published_bento(tmp_path)
    for models in (("llama3",), ("llama3:v1",), ()):
        reporter = gate(bento, models)
        assert ("condition True", "ModelsCached") in reporter.reasons, models


def shard_of(bento: PublishedBento) -> Path:
    return bento.models_dir / "llama3" / "v1" / "model.safetensors"


def test_a_mismatch_is_purged_and_read_again_before_the_gate_opens(tmp_path: Path) -> None:
    bento = published_bento(tmp_path)
    shard = shard_of(bento)
    good = shard.read_bytes()
    flip_middle_byte(shard)
    purger = RecordingPurger(fix=lambda paths: shard.write_bytes(good))
    reporter = gate(bento, purger=purger)
    assert purger.asked == [[shard]]
    assert reporter.reasons == [
        ("event", "WarmupStarted"),
        ("event", "CacheBlocksPurged"),
        ("event", "ModelsReady"),
        ("condition True", "ModelsCached"),
        ("event", "Ready"),
    ]
    purged = reporter.message("CacheBlocksPurged")
    assert purged.startswith("llama3/v1/model.safetensors: sha256 ")
    assert "evicting the file's cached blocks" in purged
    assert "2 files verified" in reporter.message("ModelsReady")


def test_a_second_mismatch_keeps_the_gate_shut(tmp_path: Path) -> None:
    bento = published_bento(tmp_path)
    flip_middle_byte(shard_of(bento))
    purger = RecordingPurger()
    reporter = gate(bento, purger=purger)
    assert purger.asked == [[shard_of(bento)]]
    assert_shut(reporter)
    assert reporter.reasons.index(("event", "CacheBlocksPurged")) < reporter.reasons.index(
        ("event", "VerificationFailed")
    )
    assert reporter.message("VerificationFailed").endswith(
        "(read again after evicting its cached blocks)"
    )


@pytest.mark.parametrize("error", [MountError("juicefs warmup --evict exited"), OSError("EIO")])
def test_a_purge_that_fails_keeps_the_gate_shut_and_says_why(
    tmp_path: Path, error: BaseException
) -> None:
    bento = published_bento(tmp_path)
    flip_middle_byte(shard_of(bento))
    reporter = gate(bento, purger=RecordingPurger(fail_with=error))
    assert_shut(reporter)
    assert f"evicting its cached blocks failed: {error}" in reporter.message("VerificationFailed")


def test_without_a_purger_the_first_mismatch_keeps_the_gate_shut(tmp_path: Path) -> None:
    bento = published_bento(tmp_path)
    flip_middle_byte(shard_of(bento))
    reporter = gate(bento)
    assert_shut(reporter)
    assert "CacheBlocksPurged" not in {r for _, r in reporter.reasons}


# -- the node agent verifies the same way --------------------------------------------------


def wanted(settings: Settings) -> WantedBento:
    """The Bento a node agent would warm for a pod with these settings."""
    ref = BentoRef(settings.volume, settings.bento_name, settings.bento_version)
    return WantedBento(ref, settings.bento_path, settings.models, changed_at="", workloads=())


def test_the_node_agent_refuses_what_the_sidecar_refuses(tmp_path: Path) -> None:
    bento = published_bento(tmp_path)
    settings = settings_for(bento)
    agent = MountedBento(wanted(settings), JuiceFSMount(settings.mount_spec()), Warmup())
    manifest = read_manifest(bento.bento_dir)
    assert [f.path for f in agent.files(manifest)] == [f.path for f in manifest.select(())]
    copied = replace_bento(manifest, "other-service:v3")
    with pytest.raises(ManifestMismatch, match="not this pod's 'llama3-service:v1'"):
        agent.files(copied)
    typo = MountedBento(
        wanted(replace(settings, models=("llama4",))), JuiceFSMount(settings.mount_spec()), Warmup()
    )
    with pytest.raises(ManifestMismatch, match="models llama4"):
        typo.files(manifest)
    # Its warm() catches VerificationError: a refused manifest is a VerificationFailed Event.
    assert issubclass(ManifestMismatch, VerificationError)
    # Evicting removes what the manifest lists whatever it names: no check to fail there.
    assert agent.listed(copied) == manifest.select(())
    assert typo.listed(manifest) == []


def test_the_purge_is_juicefs_warmup_evict(tmp_path: Path) -> None:
    """JuiceFSMount is the purger: its evict_cache runs `juicefs warmup --evict` on the paths."""
    script = tmp_path / "juicefs"
    log = tmp_path / "args"
    script.write_text(f'#!/bin/sh\necho "$@" > {log}\n')
    script.chmod(0o755)
    settings = replace(settings_for(published_bento(tmp_path)), juicefs_bin=str(script))
    mount = JuiceFSMount(settings.mount_spec())
    path = mount.models_dir / "llama3" / "v1" / "model.safetensors"
    asyncio.run(mount.evict_cache([path]))
    args = log.read_text().split()
    assert args[:2] == ["--no-agent", "warmup"]
    assert args[-2:] == ["--evict", str(path)]


def fake_juicefs(tmp_path: Path, checks: Sequence[str]) -> Path:
    """A juicefs whose `warmup --check` answers each line of checks in turn (then the last)."""
    answers = tmp_path / "checks"
    answers.write_text("\n".join(checks) + "\n")
    script = tmp_path / "fake-juicefs"
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in *--check*)\n'
        f'  line=$(head -n 1 {answers}); echo "$line" >&2\n'
        f'  [ "$(wc -l < {answers})" -gt 1 ] && sed -i 1d {answers} ;;\n'
        "esac\nexit 0\n"
    )
    script.chmod(0o755)
    return script


FULL = "check cache: 2 files checked, 16 MiB of 16 MiB (100.0%) cached"
SHORT = "check cache: 2 files checked, 12 MiB of 16 MiB (75.0%) cached"


class UnpausedMount(JuiceFSMount):
    """The real mount, its fill rounds without the pause between them (seconds, in a test)."""

    async def fill_cache(self, paths: Sequence[Path], rounds: int = 5, pause: float = 1.0) -> None:
        await super().fill_cache(paths, rounds, pause=0.0)


@pytest.mark.parametrize(
    ("checks", "recorded"),
    [
        ([FULL], None),
        # Short after every round (the object store failing): never recorded warm.
        ([SHORT], "the cache holds 12 MiB of 16 MiB (75.0%) of the model after 5 rounds"),
    ],
)
def test_the_node_agent_records_warm_only_after_a_complete_fill(
    tmp_path: Path, checks: list[str], recorded: str | None
) -> None:
    bento = published_bento(tmp_path)
    juicefs = fake_juicefs(tmp_path, checks)
    # The published directory stands in for the agent's private mount of the Bento.
    settings = replace(settings_for(bento), juicefs_bin=str(juicefs), private_mount=bento.bento_dir)
    agent = MountedBento(wanted(settings), UnpausedMount(settings.mount_spec()), Warmup())
    files = agent.files(read_manifest(bento.bento_dir))

    async def warm() -> Progress:
        return await agent.warm(files, on_progress=lambda p: None, on_error=lambda p, e: None)

    if recorded is None:
        assert asyncio.run(warm()).done_files == len(files)
        return
    with pytest.raises(MountError, match=re.escape(recorded)):
        asyncio.run(warm())
