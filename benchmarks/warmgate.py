"""Warm gate: on a node where the Bento is sealed, how long from the sidecar's start to its gate.

Unprivileged sidecars with the node agent on the
local node, in node cache mode. For a small and a large model (2 and 8 GiB
by default): a first pod makes the agent warm and verify the Bento into the
node cache (on demand), then a second pod on the now warm node has its gate
opened from the agent's seal plus a check that every block is present,
without hashing again. The figure is the second pod's own
`bento_juicefs_sidecar_time_to_ready_seconds` (from the sidecar process's
start to the condition set True), scraped from its metrics port.

Targets (issue 15): at most 2 s each, and the large one at most 1.2x the
small one: the gate must not grow with the model.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.record import MIB, new_record, say
from devcluster.cluster import wait_for
from devcluster.control.plane import ControlPlane
from devcluster.images import SAMPLE_BENTO_IMAGE
from devcluster.local import local_cluster
from devcluster.storage.stack import StorageStack

SCENARIO = "warm-start"
NAMESPACE = "bench-warm-gate"
GATE = "juicefs.bentoml.com/models-ready"
TARGET_S = 2.0
TARGET_RATIO = 1.2
_TIME_TO_READY = re.compile(r"^bento_juicefs_sidecar_time_to_ready_seconds (\S+)$", re.M)


def pod(name: str, bento: str, version: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                "juicefs.bentoml.com/model-store": "juicefs",
                "yatai.ai/bento-repository": bento,
                "yatai.ai/bento-version": version,
            },
            "annotations": {"juicefs.bentoml.com/cache-mode": "node"},
        },
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "main",
                    "image": SAMPLE_BENTO_IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sleep", "3600"],
                }
            ],
        },
    }


def gate_open(cp: ControlPlane, name: str) -> dict[str, Any] | None:
    found: dict[str, Any] = cp.get_json("pod", name, "-n", NAMESPACE)
    for condition in found.get("status", {}).get("conditions") or []:
        if condition["type"] == GATE and condition["status"] == "True":
            return found
    return None


def time_to_ready(ip: str) -> float:
    with urllib.request.urlopen(f"http://{ip}:9465/metrics", timeout=10) as response:
        text = response.read().decode()
    match = _TIME_TO_READY.search(text)
    if match is None:
        raise RuntimeError("the sidecar's metrics carry no time_to_ready")
    return float(match[1])


def run_pod(
    cp: ControlPlane, name: str, bento: str, version: str, timeout: float
) -> dict[str, Any]:
    started = time.monotonic()
    cp.kubectl("create", "-n", NAMESPACE, "-f", "-", input=json.dumps(pod(name, bento, version)))
    found: dict[str, Any] = wait_for(
        lambda: gate_open(cp, name), timeout=timeout, interval=0.3, what=f"pod {name}'s gate"
    )
    gate = next(c for c in found["status"]["conditions"] if c["type"] == GATE)
    return {
        "pod": name,
        "create_to_gate_s": round(time.monotonic() - started, 2),
        "sidecar_start_to_gate_s": round(time_to_ready(found["status"]["podIP"]), 3),
        "reason": gate["reason"],
        "message": gate["message"],
    }


def measure(cp: ControlPlane, storage: StorageStack, work: Path, mib: int) -> dict[str, Any]:
    bento, version = f"gate-{mib}m", "v1"
    say(SCENARIO, f"publishing a {mib} MiB model")
    manifest = storage.publish_random(work, bento, version, [mib * MIB // 4] * 4)
    cold = run_pod(cp, f"cold-{mib}m", bento, version, timeout=1800)
    say(SCENARIO, f"{mib} MiB: cold pod's gate after {cold['create_to_gate_s']} s (agent warmed)")
    warm = run_pod(cp, f"warm-{mib}m", bento, version, timeout=300)
    say(SCENARIO, f"{mib} MiB: warm pod's gate {warm['sidecar_start_to_gate_s']} s after its start")
    return {"model_bytes": manifest.total_bytes, "cold": cold, "warm": warm}


def run(args: argparse.Namespace) -> dict[str, Any]:
    small, large = args.gate_small_mib, args.gate_large_mib
    record = new_record(SCENARIO, {"small_mib": small, "large_mib": large, "cache_mode": "node"})
    work = Path(tempfile.mkdtemp(prefix="bench-warm-gate-", dir=args.work_dir))
    cp = local_cluster(work / "cluster")
    cp.start()
    try:
        storage = cp.addons["storage"]
        assert isinstance(storage, StorageStack)
        # The node agent (a cluster add-on) warms each Bento on the cold pod's seal.
        cp.create_namespace(NAMESPACE, {"juicefs.bentoml.com/injection": "enabled"})
        cp.wait_provisioned(NAMESPACE)
        runs = {"small": measure(cp, storage, work, small)}
        runs["large"] = measure(cp, storage, work, large)
    finally:
        cp.stop()
        shutil.rmtree(work, ignore_errors=True)
    small_s = runs["small"]["warm"]["sidecar_start_to_gate_s"]
    large_s = runs["large"]["warm"]["sidecar_start_to_gate_s"]
    record.update(
        {
            "warm_gate_s_small": small_s,
            "warm_gate_s_large": large_s,
            "small_model_bytes": runs["small"]["model_bytes"],
            "large_model_bytes": runs["large"]["model_bytes"],
            "warm_gate_target_s": TARGET_S,
            "warm_gate_small_vs_target": round(small_s / TARGET_S, 3),
            "warm_gate_large_vs_target": round(large_s / TARGET_S, 3),
            "warm_gate_large_vs_small": round(large_s / small_s, 3),
            "warm_gate_large_vs_small_target": TARGET_RATIO,
            "runs": runs,
        }
    )
    return record


def table(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    small_mib = record["small_model_bytes"] / MIB
    large_mib = record["large_model_bytes"] / MIB
    return [
        (
            f"warm gate, {small_mib:.0f} MiB (sidecar start to models-ready, sealed node)",
            f"{record['warm_gate_s_small']} s",
            f"{record['warm_gate_small_vs_target']:.2f}x the {TARGET_S:.0f} s target",
        ),
        (
            f"warm gate, {large_mib:.0f} MiB",
            f"{record['warm_gate_s_large']} s",
            f"{record['warm_gate_large_vs_target']:.2f}x the {TARGET_S:.0f} s target; "
            f"{record['warm_gate_large_vs_small']:.2f}x the small one (target "
            f"{TARGET_RATIO}x)",
        ),
    ]
