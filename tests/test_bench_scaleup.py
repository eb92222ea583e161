"""The scale-up benchmark's pure parts: the figures it reports and the pods it bursts."""

from __future__ import annotations

from benchmarks.__main__ import parser
from benchmarks.coldstart import ours_docs
from benchmarks.scaleup import burst_pod, overhead, placement_fraction, ratio


def test_the_burst_overhead_is_the_ratio_of_the_medians_less_one() -> None:
    assert overhead([3.6, 4.0, 3.6], [1.4, 1.37, 1.35]) == round(3.6 / 1.37 - 1, 4)
    assert overhead([1.02], [1.0]) == 0.02
    assert overhead([], [1.0]) is None
    assert overhead([1.0], [0.0]) is None


def test_the_placement_fraction_counts_landings_on_the_warm_node() -> None:
    assert placement_fraction(["a"] * 9 + ["b"], "a") == 0.9
    assert placement_fraction([], "a") is None
    assert ratio(8.37, 5.57) == 1.503
    assert ratio(None, 1.0) is None


def test_a_burst_pod_is_the_examples_template_under_its_own_name() -> None:
    docs = ours_docs("v9")
    pod = burst_pod(docs, 7)
    assert pod["kind"] == "Pod"
    assert pod["metadata"]["name"] == "burst-7"
    assert pod["metadata"]["labels"]["yatai.ai/bento-version"] == "v9"
    assert pod["spec"]["containers"][0]["name"] == "main"


def test_the_scale_up_defaults_are_the_issues() -> None:
    args = parser().parse_args(["--scenario", "scale-up"])
    assert (args.nodes, args.placements, args.burst_pods, args.burst_concurrency) == (
        3,
        10,
        1000,
        8,
    )
