"""`make bench`: every scenario (or one), one table, bench-results/<scenario>.json each.

    python -m benchmarks                          # streaming, cold-start, warm-start, admission,
                                                  # load, redis, agent-lists, scale-up
    python -m benchmarks --scenario cold-start    # one (make bench SCENARIO=cold-start)
    python -m benchmarks --scenario warm-start --repeats 1 --cold-large-mib 0   # a quick one
    python -m benchmarks --scenario load          # make bench-load: 10,000 reviews, errors, memory
    python -m benchmarks --scenario redis         # a tenant's read flood vs another's metadata
    python -m benchmarks --scenario agent-lists   # make bench-agent: the agent's LISTs and memory
    python -m benchmarks --scenario scale-up      # 3 real nodes: warm/cold scale-up, placement

Figures are ratios measured in one run against a limit measured in the same
run; absolute times are printed, never asserted. cold-start and warm-start
share one cluster and one set of runs: at a small and a large model size,
`--repeats` runs each, medians and their spread. See BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import (
    admission,
    agent_lists,
    coldstart,
    redis_isolation,
    scaleup,
    streaming,
    warmgate,
)
from benchmarks import load as load_scenario
from benchmarks.record import DEFAULT_OUT, load, say, write_record
from benchmarks.store import interrupts_as_exit
from common.logs import configure_logging
from devcluster.storage.shaped_link import LinkProfile

Runner = Callable[[argparse.Namespace, coldstart.SharedSession], dict[str, Any]]
Table = Callable[[dict[str, Any]], list[tuple[str, str, str]]]


def warm_start(args: argparse.Namespace, shared: coldstart.SharedSession) -> dict[str, Any]:
    """Apply to Ready on a warm node (coldstart), then the sealed gate (warmgate) in its own
    cluster, after the shaped one is stopped: one record, bench-results/warm-start.json."""
    record = coldstart.run_warm(args, shared)
    shared.close()
    gate = warmgate.run(args)
    record["warm_gate"] = gate.pop("runs")
    record.update({k: v for k, v in gate.items() if k.startswith(("warm_gate", "small", "large"))})
    return record


def warm_start_table(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [*coldstart.table(record), *warmgate.table(record)]


def alone(run: Callable[[argparse.Namespace], dict[str, Any]]) -> Runner:
    """A scenario that needs no shared cluster."""
    return lambda args, shared: run(args)


SCENARIOS: dict[str, tuple[Runner, Table]] = {
    "streaming": (alone(streaming.run), streaming.table),
    "cold-start": (coldstart.run_cold, coldstart.table),
    "warm-start": (warm_start, warm_start_table),
    "admission": (alone(admission.run), admission.table),
    "load": (alone(load_scenario.run), load_scenario.table),
    "redis": (alone(redis_isolation.run), redis_isolation.table),
    "agent-lists": (alone(agent_lists.run), agent_lists.table),
    "scale-up": (alone(scaleup.run), scaleup.table),
}


def profile(text: str) -> LinkProfile:
    """MBPS or MBPS+DELAYms, e.g. 200 or 200+30ms."""
    rate, _, delay = text.partition("+")
    return LinkProfile(float(rate), float(delay.removesuffix("ms") or 0))


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1, not {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS))
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work-dir", type=Path, default=None, help="for temporary files (2+ GiB)")
    g = p.add_argument_group("streaming")
    g.add_argument("--size-mib", type=int, default=2048)
    g.add_argument("--shards", type=int, default=4)
    g.add_argument("--rounds", type=int, default=2)
    g.add_argument("--raw-connections", type=int, default=16)
    g.add_argument(
        "--profiles",
        type=lambda s: [profile(x) for x in s.split(",")],
        default=[profile("200"), profile("100"), profile("200+30ms")],
        help="link profiles, comma-separated: 200,100,200+30ms",
    )
    g = p.add_argument_group("cold-start and warm-start")
    g.add_argument("--cold-size-mib", type=int, default=2048, help="the small model")
    g.add_argument(
        "--cold-large-mib", type=int, default=8192, help="the large model (0: small one only)"
    )
    g.add_argument(
        "--repeats",
        type=at_least_one,
        default=3,
        help="runs per size (a new Bento version each); medians",
    )
    g.add_argument("--cold-profile", type=profile, default=profile("200"))
    g.add_argument("--gate-small-mib", type=int, default=2048, help="warm gate: small model")
    g.add_argument("--gate-large-mib", type=int, default=8192, help="warm gate: large model")
    g = p.add_argument_group("scale-up")
    g.add_argument("--nodes", type=at_least_one, default=3, help="real nodes of one GPU pool")
    g.add_argument("--scale-mib", type=int, default=1024, help="the scaled Bento's model")
    g.add_argument("--placements", type=at_least_one, default=10, help="one replica each")
    g.add_argument("--burst-pods", type=at_least_one, default=1000)
    g.add_argument("--burst-concurrency", type=at_least_one, default=8)
    g.add_argument("--burst-rounds", type=at_least_one, default=3, help="of each side, alternating")
    g = p.add_argument_group("admission")
    g.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    g.add_argument("--connections", type=int, default=16)
    g.add_argument("--mutation-runs", type=int, default=2000)
    g.add_argument(
        "--injector-tree",
        type=Path,
        default=None,
        help="run the injector from this checkout (a before/after comparison)",
    )
    g = p.add_argument_group("load")
    g.add_argument("--load-requests", type=int, default=10_000, help="reviews per run")
    g.add_argument("--load-connections", type=int, default=500)
    g.add_argument("--load-runs", type=int, default=3, help="kept-alive runs (2+)")
    g.add_argument("--rotate-seconds", type=float, default=0.5, help="a new serving cert every")
    g.add_argument("--slow-connections", type=int, default=1000)
    g.add_argument("--flood-connections", type=int, default=100, help="large-review flood")
    g.add_argument("--flood-body-kib", type=int, default=900, help="each flood review's body")
    g.add_argument("--flood-probes", type=int, default=300, help="small reviews timed meanwhile")
    g = p.add_argument_group("redis")
    g.add_argument("--redis-seconds", type=float, default=20.0, help="stat loop per case")
    g.add_argument("--redis-connections", type=int, default=32, help="the flood's connections")
    agent_lists.add_arguments(p)
    return p


def print_table(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    fig = max(len(r[1]) for r in rows)
    for what, figure, ratio in rows:
        print(f"  {what:<{width}}  {figure:>{fig}}  {ratio}")


def sizes_problem(args: argparse.Namespace) -> str | None:
    """Why the model sizes asked for cannot run (None: they can), said before any work.

    Each size is published as its own Bento version, once: two equal sizes
    would publish the same version twice, which the model store refuses.
    """
    if args.gate_small_mib == args.gate_large_mib:
        return (
            f"--gate-small-mib and --gate-large-mib are both {args.gate_small_mib}: "
            "give two different sizes"
        )
    if args.cold_large_mib and args.cold_large_mib == args.cold_size_mib:
        return (
            f"--cold-size-mib and --cold-large-mib are both {args.cold_size_mib}: give two "
            "different sizes, or --cold-large-mib 0 for one"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    arguments = parser()
    args = arguments.parse_args(argv)
    if (problem := sizes_problem(args)) is not None:
        arguments.error(problem)
    configure_logging("warning")  # the sidecar's mount logs juicefs's lines at debug
    names = args.scenario or list(SCENARIOS)
    failed = []
    rows: list[tuple[str, str, str]] = []
    shared = coldstart.SharedSession()
    with interrupts_as_exit():
        try:
            for name in names:
                run, table = SCENARIOS[name]
                say(name, f"starting (load {load()})")
                try:
                    record = run(args, shared)
                except KeyboardInterrupt:
                    say(name, "interrupted; cleaning up")
                    return 130
                except Exception:
                    traceback.print_exc()
                    failed.append(name)
                    continue
                path = write_record(args.out_dir, record)
                say(name, f"written to {path}")
                rows.extend((f"[{name}] {what}", fig, ratio) for what, fig, ratio in table(record))
                if not set(names[names.index(name) + 1 :]) & {"cold-start", "warm-start"}:
                    shared.close()  # no idle cluster under the scenarios that follow
        finally:
            shared.close()  # the cluster both cold-start and warm-start use, if started
    if rows:
        print("\nbench results (ratios measured in the same run; absolute times not asserted):")
        print_table(rows)
        print(f"load average now: {json.dumps(load())}; JSON in {args.out_dir}/")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
