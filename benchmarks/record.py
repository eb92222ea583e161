"""What every scenario's JSON carries (machine, versions, load), and how it is written.

record = new_record("streaming", settings={"model_mib": 2048})
...fill in figures...
write_record(out_dir, record)        # bench-results/streaming.json
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench-results"
MIB = 1 << 20


def say(scenario: str, message: str) -> None:
    print(f"[bench {scenario} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load() -> dict[str, float]:
    """The 1, 5 and 15 minute load averages (ratios stay meaningful; absolute times drift)."""
    one, five, fifteen = os.getloadavg()
    return {"1m": round(one, 2), "5m": round(five, 2), "15m": round(fifteen, 2)}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    with contextlib.suppress(OSError, ValueError):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(memory / (1 << 30), 1),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def git_commit() -> str:
    proc = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() + ("+local-changes" if dirty.stdout.strip() else "")


def package_versions(names: Sequence[str]) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def new_record(scenario: str, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(),
        "machine": machine(),
        "load_before": load(),
        "versions": {},
        "settings": settings,
    }


def write_record(out_dir: Path, record: dict[str, Any]) -> Path:
    record["load_after"] = load()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{record['scenario']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0
