"""Redis isolation: one tenant's read flood against another tenant's metadata latency.

A tenant's reader may run only the six read commands a read-only mount
needs (docs/tenants.md), but Redis has no per-user rate or CPU limit: a
tenant at full speed (redis-benchmark with its reader user, pipelined GETs)
can keep a single-threaded Redis busy. The defence is a metadata engine per
volume. This measures what that buys, on real components: a victim's
read-only JuiceFS 1.4.2 mount of volume `team-b` (attribute and entry caches
off, so every `stat` is a Redis round trip) stats files in a loop while:

1. `quiet`: nothing else runs;
2. `shared engine`: the flood hits the victim's own Redis (another database
   of it, as when volumes share one instance);
3. `own engines`: the flood hits the other tenant's Redis (`team-a`, the
   layout devcluster and docs/tenants.md prescribe).

Both cores are in use: the victim's Redis is pinned to CPU 0 and the
flood's client and the other Redis to CPU 1 (taskset), as separate engines
would sit on separate hosts; the victim's mount and stat loop run unpinned.
Figures: stat p50 and p99 for each case, and each case's p99 against the
quiet p99 (the limit). Absolute times are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.record import new_record, say
from common.processes import spawn_group, stop_group
from devcluster.storage.redis import Redis
from devcluster.storage.stack import StorageStack

SCENARIO = "redis"
FILES = 200


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` of values lie (nearest rank); 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[rank]


def stat_latencies(paths: list[Path], seconds: float) -> list[float]:
    """Milliseconds of each os.stat over paths, round after round, for `seconds`."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for path in paths:
            start = time.perf_counter()
            os.stat(path)
            latencies.append((time.perf_counter() - start) * 1000)
    return latencies


def pin(redis: Redis, cpu: int) -> None:
    """Every thread of redis's server on one CPU."""
    if redis.process is None:
        raise RuntimeError("redis is not running")
    pid = str(redis.process.pid)
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), pid], check=True, capture_output=True)


@contextlib.contextmanager
def flood(redis: Redis, db: int, log: Path, connections: int) -> Iterator[None]:
    """redis-benchmark as redis's reader: pipelined GETs at full speed, on CPU 1, until exit."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise RuntimeError("redis-benchmark (Debian's redis-tools) is missing")
    args = [
        "taskset", "-c", "1", binary,
        "-h", redis.host, "-p", str(redis.port),
        "--user", redis.reader_user, "-a", redis.reader_password,
        "--dbnum", str(db), "-c", str(connections), "-P", "16",
        "-n", "2000000000", "-t", "get", "-q",
    ]  # fmt: skip
    process = spawn_group(args, log)
    try:
        time.sleep(1.0)  # its connections open and the pipeline fills
        if process.poll() is not None:
            raise RuntimeError(f"redis-benchmark exited at once: see {log}")
        yield
    finally:
        stop_group(process, 5)


def commands_processed(redis: Redis) -> int:
    """The engine's total_commands_processed (INFO stats, as its admin)."""
    for line in str(redis.command("INFO", "stats")).splitlines():
        key, _, value = line.partition(":")
        if key == "total_commands_processed":
            return int(value)
    return 0


def flooded(redis: Redis, seconds: float, paths: list[Path]) -> tuple[list[float], float]:
    """The stat loop's latencies, and the commands per second the flooded engine served."""
    before, start = commands_processed(redis), time.monotonic()
    latencies = stat_latencies(paths, seconds)
    rate = (commands_processed(redis) - before) / (time.monotonic() - start)
    return latencies, rate


def summary(latencies: list[float], flood_rate: float = 0.0) -> dict[str, float]:
    return {
        "flood_commands_per_s": round(flood_rate),
        "stats": len(latencies),
        "p50_ms": round(percentile(latencies, 0.50), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    record = new_record(
        SCENARIO,
        {
            "files": FILES,
            "seconds_per_case": args.redis_seconds,
            "flood": f"redis-benchmark -c {args.redis_connections} -P 16 -t get, reader user",
            "victim": "juicefs mount --read-only --attr-cache 0 --entry-cache 0, os.stat loop",
            "pinning": "victim Redis CPU 0; flood client and other Redis CPU 1",
        },
    )
    work = Path(tempfile.mkdtemp(prefix="bench-redis-", dir=args.work_dir))
    try:
        with (
            StorageStack(work / "team-a", "team-a") as other,
            StorageStack(work / "team-b", "team-b", store=other.store) as victim,
        ):
            probe_dir = victim.writer_mount / "probe"
            probe_dir.mkdir()
            for i in range(FILES):
                (probe_dir / f"f{i:04d}").write_bytes(b"x")
            tenant = victim.tenant
            mnt = victim.juicefs.mount(
                work / "victim",
                work / "victim-cache",
                meta_url=tenant.meta_url,
                env=tenant.env,
                extra_args=[
                    "--read-only", "--no-bgjob",
                    "--attr-cache", "0", "--entry-cache", "0", "--dir-entry-cache", "0",
                ],
            )  # fmt: skip
            pin(victim.redis, 0)
            pin(other.redis, 1)
            paths = sorted((mnt / "probe").iterdir())
            stat_latencies(paths, 2.0)  # warm the mount's own structures
            cases: dict[str, dict[str, float]] = {}
            say(SCENARIO, "quiet")
            cases["quiet"] = summary(stat_latencies(paths, args.redis_seconds))
            say(SCENARIO, "flood on the victim's own engine (shared instance)")
            with flood(victim.redis, 2, work / "flood-shared.log", args.redis_connections):
                cases["shared_engine"] = summary(*flooded(victim.redis, args.redis_seconds, paths))
            say(SCENARIO, "flood on the other tenant's engine (an engine per volume)")
            with flood(other.redis, 1, work / "flood-own.log", args.redis_connections):
                cases["own_engines"] = summary(*flooded(other.redis, args.redis_seconds, paths))
            victim.juicefs.umount(mnt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    quiet = cases["quiet"]["p99_ms"] or 1e-9
    for figures in cases.values():
        figures["p99_vs_quiet"] = round(figures["p99_ms"] / quiet, 2)
    record["cases"] = cases
    return record


def table(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for case, figures in record["cases"].items():
        rows.append(
            (
                f"victim stat under a tenant's read flood: {case.replace('_', ' ')}",
                f"p50 {figures['p50_ms']:.3f} ms, p99 {figures['p99_ms']:.3f} ms"
                + (
                    f" ({figures['flood_commands_per_s'] / 1000:.0f}k flood cmd/s)"
                    if figures["flood_commands_per_s"]
                    else ""
                ),
                f"{figures['p99_vs_quiet']:.2f}x the quiet p99",
            )
        )
    return rows
