"""Mutation time per pod, in process: median of many runs (part of `make bench SCENARIO=admission`).

    python -m benchmarks.bench_mutation [--runs N] [--out FILE]

Measures the webhook hot path without the network: parse the AdmissionReview
body (pydantic, from JSON bytes), decide, build the patch, encode the
response. Compared against a deep-copy-and-diff baseline (jsonpatch.make_patch
on the applied result), the approach the house rules reject.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonpatch

from injector.admission import parse_review, review
from injector.config import InjectorConfig

LABELS = {
    "juicefs.bentoml.com/model-store": "juicefs",
    "yatai.ai/bento-repository": "llama3-8b-service",
    "yatai.ai/bento-version": "v20260101",
    "app.kubernetes.io/name": "llama3",
}


def bento_pod(env_count: int = 12) -> dict[str, Any]:
    env = [{"name": f"BENTOML_VAR_{i}", "value": f"value-{i}"} for i in range(env_count)]
    probe = {"httpGet": {"path": "/readyz", "port": 3000}, "periodSeconds": 5}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "llama3-7d9f-", "namespace": "serving", "labels": LABELS},
        "spec": {
            "serviceAccountName": "llama3",
            "containers": [
                {
                    "name": "main",
                    "image": "us-docker.pkg.dev/acme/bentos/llama3:v20260101",
                    "ports": [{"name": "http", "containerPort": 3000}],
                    "env": env,
                    "readinessProbe": probe,
                    "livenessProbe": {**probe, "httpGet": {"path": "/livez", "port": 3000}},
                    "resources": {
                        "requests": {"cpu": "4", "memory": "32Gi"},
                        "limits": {"nvidia.com/gpu": "1", "memory": "48Gi"},
                    },
                },
                {"name": "metrics", "image": "quay.io/prometheus/statsd-exporter:v0.26.0"},
            ],
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": "cloud.google.com/gke-accelerator",
                                        "operator": "In",
                                        "values": ["nvidia-l4"],
                                    }
                                ]
                            }
                        ]
                    }
                }
            },
        },
    }


def body_for(pod: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "bench",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "operation": "CREATE",
                "namespace": "serving",
                "object": pod,
            },
        }
    ).encode()


def median_us(fn: Callable[[], object], runs: int) -> float:
    for _ in range(min(50, runs)):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def measure_in_process(runs: int) -> dict[str, Any]:
    """Median microseconds per pod for a Bento pod and a pod with 1,500 env vars."""
    config = InjectorConfig()
    results: dict[str, Any] = {"runs": runs, "unit": "microseconds (median)"}
    for case, pod in (("bento", bento_pod()), ("env-1500", bento_pod(env_count=1500))):
        body = body_for(pod)

        def hot_path(body: bytes = body) -> object:
            return json.dumps(review(parse_review(body).request, config).response)

        request = parse_review(body).request

        def mutate_only(request: Any = request) -> object:
            return review(request, config)

        ops = review(request, config).ops

        def diff_baseline(pod: dict[str, Any] = pod, ops: Any = ops) -> object:
            return jsonpatch.make_patch(pod, jsonpatch.apply_patch(copy.deepcopy(pod), ops))

        results[case] = {
            "body_bytes": len(body),
            "parse_decide_patch_encode_us": round(median_us(hot_path, runs), 1),
            "decide_and_patch_us": round(median_us(mutate_only, runs), 1),
            "deepcopy_diff_baseline_us": round(median_us(diff_baseline, max(50, runs // 10)), 1),
            "patch_operations": len(ops),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    text = json.dumps(measure_in_process(args.runs), indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
