"""The cold/warm start benchmark's pure parts (benchmarks/coldstart.py), without a cluster.

Names (a new Bento version per repeat, `_large` keys), the figures a
repeat's milestones give (pod start, the app's start from local disk, the
warm target), medians and spreads over repeats, the node cache's copies of
a model's blocks, and the table built from a record.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from benchmarks import coldstart
from benchmarks.coldstart import (
    FIGURES,
    Repeat,
    SizeRuns,
    StartResult,
    app_local_start_seconds,
    bento_version,
    cached_copies,
    median_of,
    pod_start_seconds,
    repeat_figures,
    sized,
    spread_of,
    summarize,
    warm_target_seconds,
)
from benchmarks.record import MIB

LABEL_VALUE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")

# The baseline's milestones (seconds after apply): the download ran from 3 to 13 s.
BASELINE_MILESTONES = {
    "scheduled": 0.2,
    "fetch-model running": 3.0,
    "fetch-model finished": 13.0,
    "main running": 14.5,
    "main ready": 20.5,
    "Ready=True": 20.6,
}
LOCAL_LOAD = "loaded 7 model file(s), 2147683648 bytes, from /home/bentoml/bento/models in 2.4 s"
WARM_EVENT = "2048 MiB verified: 2048 MiB (100.0%) from the node cache"


def start(seconds: float, milestones: dict[str, float] | None = None, **kw: Any) -> StartResult:
    return StartResult(seconds, milestones or {"Ready=True": seconds}, "pod", **kw)


def baseline(seconds: float = 20.6) -> StartResult:
    return start(seconds, dict(BASELINE_MILESTONES), app_log=[LOCAL_LOAD], store_mib=2048.0)


def one_repeat(cold_s: float, warm_s: float | None, baseline_s: float) -> dict[str, float | None]:
    cold = start(cold_s, store_mib=4096.0)
    warm = None
    if warm_s is not None:
        warm = start(warm_s, events=[{"reason": "ModelsReady", "message": WARM_EVENT}])
    return repeat_figures(cold, warm, baseline(baseline_s), limit_s=20.0)


# -- names ---------------------------------------------------------------------


def test_the_large_model_keys_carry_a_suffix() -> None:
    assert sized("cold_start_s", False) == "cold_start_s"
    assert sized("cold_start_s", True) == "cold_start_s_large"
    assert sized("warm_start_vs_target", True) == "warm_start_vs_target_large"


def test_every_repeat_and_size_publishes_a_version_of_its_own() -> None:
    template = coldstart.deployment_of(coldstart.example_docs())["spec"]["template"]
    base = template["metadata"]["labels"]["yatai.ai/bento-version"]
    versions = [bento_version(base, mib, i) for mib in (2048, 8192) for i in range(10)]
    assert len(set(versions)) == len(versions)
    for version in versions:
        assert LABEL_VALUE.fullmatch(version), version
        assert len(version) <= 63
        assert version.startswith(base)
    assert bento_version("4fd7wxrbkcxfylg5", 8192, 2) == "4fd7wxrbkcxfylg5-8192m-r2"


@pytest.mark.parametrize("base", ["x" * 60, "bad_version", "-leading"])
def test_a_version_that_is_no_label_value_is_refused(base: str) -> None:
    with pytest.raises(ValueError, match="label value"):
        bento_version(base, 8192, 0)


def test_each_repeat_applies_its_own_version_to_ours_and_the_baseline() -> None:
    ours = coldstart.deployment_of(coldstart.ours_docs("v-2048m-r1"))
    labels = ours["spec"]["template"]["metadata"]["labels"]
    assert labels["yatai.ai/bento-version"] == "v-2048m-r1"
    assert labels["juicefs.bentoml.com/model-store"] == "juicefs"
    assert ours["spec"]["replicas"] == 1
    key = coldstart.plain_key("llama", 8192, "llm/v1/model-00001-of-00004.safetensors")
    assert key == "plain/llama/8192m/models/llm/v1/model-00001-of-00004.safetensors"
    spec = coldstart.fetch_spec("http://store:9000", "bucket", [(key, "llm/v1/m", 5)])
    docs = coldstart.baseline_docs("v-8192m-r2", spec)
    deployment = coldstart.deployment_of(docs)
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"]["yatai.ai/bento-version"] == "v-8192m-r2"
    assert "juicefs.bentoml.com/model-store" not in template["metadata"]["labels"]
    assert deployment["metadata"]["namespace"] == coldstart.BASELINE_NAMESPACE
    assert [c["name"] for c in template["spec"]["initContainers"]] == ["fetch-model"]
    assert '"key": "plain/llama/8192m/models/' in docs[0]["data"]["spec.json"]


# -- figures from milestones -----------------------------------------------------


def test_pod_start_is_the_app_running_less_the_download() -> None:
    # main running at 14.5 s, less the 10 s download.
    assert pod_start_seconds(baseline()) == 4.5


def test_the_apps_local_start_is_running_to_ready() -> None:
    assert app_local_start_seconds(baseline()) == 6.0
    without_main_ready = {k: v for k, v in BASELINE_MILESTONES.items() if k != "main ready"}
    assert app_local_start_seconds(start(20.6, without_main_ready)) == 6.1


def test_missing_milestones_give_no_figure() -> None:
    assert pod_start_seconds(start(20.0, {"main running": 14.5, "Ready=True": 20.0})) is None
    assert app_local_start_seconds(start(20.0, {"Ready=True": 20.0})) is None


def test_the_warm_target_is_1_2_times_pod_start_plus_the_apps_local_start() -> None:
    assert warm_target_seconds(4.5, 6.0) == pytest.approx(12.6)
    assert warm_target_seconds(None, 6.0) is None
    assert warm_target_seconds(4.5, None) is None


def test_a_repeats_figures() -> None:
    figures = one_repeat(30.0, 9.0, 20.6)
    assert tuple(figures) == FIGURES
    assert figures["cold_start_s"] == 30.0
    assert figures["cold_start_vs_limit"] == 1.5
    assert figures["cold_start_vs_baseline"] == pytest.approx(30.0 / 20.6, abs=1e-3)
    assert figures["pod_start_s"] == 4.5
    assert figures["app_local_start_s"] == 6.0
    assert figures["app_local_load_s"] == 2.4
    assert figures["warm_start_target_s"] == pytest.approx(12.6)
    assert figures["warm_start_vs_target"] == pytest.approx(9.0 / 12.6, abs=1e-3)
    assert figures["warm_vs_cold"] == 0.3
    assert figures["node_cache_fraction"] == 1.0
    assert figures["cold_store_mib"] == 4096.0


def test_a_repeat_without_a_warm_start_has_no_warm_figures() -> None:
    figures = one_repeat(30.0, None, 20.6)
    warm = (
        "warm_start_s",
        "warm_vs_cold",
        "warm_start_vs_target",
        "app_warm_load_s",
        "node_cache_fraction",
        "warm_store_mib",
    )
    assert {k: figures[k] for k in warm} == dict.fromkeys(warm)
    assert figures["cold_start_s"] == 30.0
    assert figures["warm_start_target_s"] == pytest.approx(12.6)  # from the baseline alone


def test_node_mode_and_fraction_from_the_models_ready_message() -> None:
    assert coldstart.node_mode("2048 MiB verified, read from the node cache")
    assert coldstart.node_mode("gate opened: sealed by the node agent")
    assert not coldstart.node_mode("2048 MiB verified, read from the pod cache")
    assert coldstart.node_cache_fraction(WARM_EVENT) == 1.0
    assert coldstart.node_cache_fraction("1024 MiB (50.0%) from the node cache") == 0.5
    assert coldstart.node_cache_fraction("sealed by the node agent") == 1.0
    assert coldstart.node_cache_fraction("from the pod cache") is None


# -- medians and spreads ------------------------------------------------------------


def test_median_and_spread_leave_out_what_was_not_measured() -> None:
    assert median_of([3.0, 1.0, 2.0]) == 2.0
    assert median_of([4.0, 1.0, None, 2.0, 3.0]) == 2.5
    assert median_of([None, None]) is None
    assert median_of([]) is None
    assert spread_of([3.0, None, 1.0, 2.0]) == [1.0, 3.0]
    assert spread_of([None]) is None


def test_summary_holds_each_figures_median_and_spread_under_sized_keys() -> None:
    per_repeat = [one_repeat(c, w, b) for c, w, b in ((30, 9, 21), (28, 8, 20), (35, 12, 22))]
    medians, spreads = summarize(per_repeat, large=True)
    assert set(medians) == {f"{name}_large" for name in FIGURES}
    assert medians["cold_start_s_large"] == 30.0
    assert medians["warm_start_s_large"] == 9.0
    assert medians["baseline_s_large"] == 21.0
    assert spreads["cold_start_s_large"] == [28.0, 35.0]
    # A ratio's median is the median of each repeat's own ratio.
    ratios = sorted(round(c / b, 3) for c, b in ((30, 21), (28, 20), (35, 22)))
    assert medians["cold_start_vs_baseline_large"] == ratios[1]
    small, _ = summarize(per_repeat, large=False)
    assert set(small) == set(FIGURES)


def size_runs(large: bool, warm: bool = True) -> SizeRuns:
    runs = SizeRuns(8192 if large else 2048, large, model_bytes=(8192 if large else 2048) * MIB)
    runs.raw = {"mib_per_s": 190.0}
    for i, (c, w, b) in enumerate(((30, 9, 21), (28, 8, 20), (35, 12, 22))):
        cold, warm_start, base = start(c), start(w) if warm else None, baseline(b)
        figures = repeat_figures(cold, warm_start, base, runs.limit_s)
        runs.repeats.append(Repeat(i, f"v-r{i}", 0, cold, warm_start, base, figures, 1.0, 1.0))
    return runs


def test_a_size_record_is_all_sized_keys_with_its_limit() -> None:
    keys, spreads = size_runs(True).record()
    assert all(key.endswith("_large") for key in [*keys, *spreads])
    for name in ("model_bytes", "raw_mb_per_s", "transfer_s", "cold_start_limit_s"):
        assert f"{name}_large" in keys
    # 1.15 x 8 GiB at 190 MiB/s, + 5 s.
    assert keys["cold_start_limit_s_large"] == round(1.15 * 8192 / 190 + 5, 2)
    assert size_runs(True).repeats[0].as_dict()["load_avg"] == {}


# -- the node cache's copies ---------------------------------------------------------


def test_the_node_caches_copies_of_a_models_blocks_are_found_by_key(tmp_path: Path) -> None:
    raw = tmp_path / "0f3e-uuid" / "raw" / "chunks" / "0" / "0"
    raw.mkdir(parents=True)
    (raw / "5_0_4194304").write_bytes(b"x")
    (raw / "6_0_4194304").write_bytes(b"y")  # another version's block: stays
    keys = ["models/chunks/0/0/5_0_4194304", "models/chunks/0/0/7_0_1024"]
    assert cached_copies(tmp_path, keys) == [raw / "5_0_4194304"]
    assert cached_copies(tmp_path / "missing", keys) == []


# -- the table ----------------------------------------------------------------------------


def record(scenario: str, warm: bool = True) -> dict[str, Any]:
    found: dict[str, Any] = {
        "scenario": scenario,
        "repeats": 3,
        "settings": {"profile": {"mb_per_s": 200.0}},
        "spread": {},
    }
    for large in (False, True):
        keys, spreads = size_runs(large, warm).record()
        found.update(keys)
        found["spread"].update(spreads)
    return found


@pytest.mark.parametrize("scenario", ["cold-start", "warm-start"])
def test_the_table_shows_both_sizes_with_their_spread(scenario: str) -> None:
    rows = coldstart.table(record(scenario))
    text = "\n".join(" | ".join(row) for row in rows)
    assert any(row[0].startswith("2048 MiB") for row in rows)
    assert any(row[0].startswith("8192 MiB") for row in rows)
    assert "3 runs 28-35 s" in text or "3 runs 8-12 s" in text
    if scenario == "warm-start":
        assert "target 1.2 x (pod start + the app's start from local disk)" in text
        assert "n/a of bytes from the node cache" in text  # no ModelsReady Event in these runs


def test_the_table_without_the_large_model_or_a_node_cache() -> None:
    found = record("warm-start", warm=False)
    for key in [k for k in found if k.endswith("_large")]:
        del found[key]
    found["node_cache"] = "not there yet"
    rows = coldstart.table(found)
    assert all(row[0].startswith("2048 MiB") for row in rows)
    assert ("2048 MiB: warm start", "n/a", "not there yet") in rows


def test_direct_reclaim_is_read_from_vmstat() -> None:
    vmstat = "pgsteal_kswapd 10\npgsteal_direct 1234\npgscan_direct 2000\n"
    assert coldstart.direct_reclaim_pages(vmstat) == 1234
    assert coldstart.direct_reclaim_pages("nr_free_pages 5\n") == 0


def test_a_disk_too_small_for_the_large_model_is_refused_up_front() -> None:
    gib = 2**30
    assert coldstart.disk_shortfall(80 * gib, 252 * gib, 8 * gib) is None
    problem = coldstart.disk_shortfall(50 * gib, 252 * gib, 8 * gib)
    assert problem is not None
    assert "needs 65 GiB" in problem


def test_equal_model_sizes_are_refused_before_any_work() -> None:
    from benchmarks.__main__ import parser, sizes_problem

    def problem(*argv: str) -> str | None:
        return sizes_problem(parser().parse_args(list(argv)))

    assert problem() is None
    gate = problem("--gate-small-mib", "512", "--gate-large-mib", "512")
    assert gate is not None
    assert "--gate-large-mib are both 512" in gate
    cold = problem("--cold-size-mib", "8192")  # the large one is 8192 by default
    assert cold is not None
    assert "--cold-large-mib 0" in cold
    assert problem("--cold-size-mib", "8192", "--cold-large-mib", "0") is None
