"""Admission: /mutate under load over TLS against the floor, same run; and in-process time.

Two servers on loopback, one after the other, each alone on the machine while
measured: the injector (`python -m injector serve --standalone`, its default
settings, info logs to a file) and the floor (`benchmarks.floor`: a bare
aiohttp handler that parses the body and returns a fixed allowed response,
with the injector's own certificate, TLS context and runner settings).
The load generator is wrk (Debian's), one thread, with a Lua script that
POSTs the AdmissionReview:

- max rate: `--connections` connections as fast as they go, `--duration` s;
- half load: the floor's max rate halved, spread over the connections with
  wrk's `delay()` (each connection waits its share between requests), and
  the latency percentiles wrk records.

Bodies: the Bento pod of examples/bento-deployment.yaml as the Deployment
controller creates it, and the 1,500-env-var pod of tests/golden/many-env.yaml
(about 78 KB). Servers and load alternate, floor first, in every round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from benchmarks.bench_mutation import measure_in_process
from benchmarks.record import REPO, median, new_record, package_versions, say
from common.ports import free_port, port_answers
from common.processes import log_tail, spawn_group, stop_group
from devcluster.packages import ensure_packages

SCENARIO = "admission"
EXAMPLE = REPO / "examples" / "bento-deployment.yaml"
MANY_ENV = REPO / "tests" / "golden" / "many-env.yaml"
UID = "3f1c1d2e-6b7a-4c51-9a7e-5d2f0b1c8e90"

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open("%(body)s", "rb"))
wrk.body = f:read("*a")
f:close()
%(delay)s
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "duration_us": %%d, "bytes": %%d, "errors": %%d, "non_2xx": %%d, ' ..
    '"p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d, "mean_us": %%.1f}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def bento_pod() -> dict[str, Any]:
    """The example Deployment's pod as the ReplicaSet controller submits it."""
    for doc in yaml.safe_load_all(EXAMPLE.read_text()):
        if doc and doc.get("kind") == "Deployment":
            template = doc["spec"]["template"]
            metadata = {
                **template["metadata"],
                "generateName": f"{doc['metadata']['name']}-5d9c7b8f64-",
                "namespace": doc["metadata"]["namespace"],
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "ReplicaSet",
                        "name": f"{doc['metadata']['name']}-5d9c7b8f64",
                        "uid": "0d6a2a5e-0f0e-4b59-8f43-3c4a2b1e9f10",
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            }
            metadata["labels"] = {**metadata["labels"], "pod-template-hash": "5d9c7b8f64"}
            return {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": metadata,
                "spec": template["spec"],
            }
    raise RuntimeError(f"{EXAMPLE} has no Deployment")


def review_body(pod: dict[str, Any]) -> bytes:
    metadata = pod["metadata"]
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": UID,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE",
                "namespace": metadata.get("namespace", "serving"),
                "userInfo": {
                    "username": "system:serviceaccount:kube-system:replicaset-controller",
                    "groups": ["system:serviceaccounts", "system:authenticated"],
                },
                "object": pod,
                "oldObject": None,
                "dryRun": False,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            },
        }
    ).encode()


def bodies() -> dict[str, bytes]:
    many = yaml.safe_load(MANY_ENV.read_text())
    return {"bento": review_body(bento_pod()), "env-1500": review_body(many)}


class Server:
    """One HTTPS server process on loopback (injector or floor), started and stopped."""

    def __init__(self, name: str, args: list[str], port: int, log: Path) -> None:
        self.name = name
        self.args = args
        self.port = port
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @contextlib.contextmanager
    def running(self) -> Iterator[Server]:
        self.process = spawn_group(self.args, self.log, cwd=REPO, die_with_parent=True)
        try:
            deadline = time.monotonic() + 30
            while not port_answers(self.port):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start:\n{log_tail(self.log)}")
                time.sleep(0.1)
            yield self
        finally:
            stop_group(self.process, 15)


def wrk(
    url: str, body: Path, work: Path, *, connections: int, duration: float, rate: float | None
) -> dict[str, Any]:
    """One wrk run; with rate, each connection waits its share of 1/rate between requests."""
    binary = ensure_packages({"wrk": "wrk"})["wrk"]
    delay = ""
    if rate:
        per_connection_ms = connections * 1000.0 / rate
        delay = f"function delay() return {per_connection_ms:.3f} end"
    script = work / f"wrk-{time.monotonic_ns()}.lua"
    script.write_text(WRK_SCRIPT % {"body": str(body), "delay": delay})
    proc = subprocess.run(
        [
            str(binary),
            "-t1",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=duration + 60,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"requests"')]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["rps"] = round(result["requests"] / (result["duration_us"] / 1e6), 1)
    result["connections"] = connections
    if rate:
        result["target_rps"] = round(rate, 1)
    return result


def _ms(us: float) -> float:
    return round(us / 1000, 3)


def run(args: argparse.Namespace) -> dict[str, Any]:
    record = new_record(
        SCENARIO,
        {
            "load_generator": "wrk -t1 (Debian), Lua POST of the AdmissionReview",
            "connections": args.connections,
            "duration_s": args.duration,
            "rounds": 2,
            "server": "one process, one event loop, TLS 1.2+ on 127.0.0.1, default settings",
            "injector_logs": "info (default), JSON lines to a file",
        },
    )
    record["versions"] = {
        **package_versions(["aiohttp", "pydantic", "structlog", "prometheus_client"]),
        "wrk": subprocess.run(
            [str(ensure_packages({"wrk": "wrk"})["wrk"]), "-v"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.splitlines()[0:1],
    }
    cases: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-admission-") as tmp:
        work = Path(tmp)
        port = free_port()
        cert_dir = work / "certs"
        config = work / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {"server": {"host": "127.0.0.1", "port": port, "certDir": str(cert_dir)}}
            )
        )
        injector = Server(
            "injector",
            [
                sys.executable,
                "-m",
                "injector",
                "serve",
                "--standalone",
                "--config",
                str(config),
            ],
            port,
            work / "injector.log",
        )
        floor = Server(
            "floor",
            [
                sys.executable,
                "-m",
                "benchmarks.floor",
                "--cert-dir",
                str(cert_dir),
                "--port",
                str(port),
            ],
            port,
            work / "floor.log",
        )
        url = f"https://127.0.0.1:{port}/mutate"
        with injector.running():  # generates the serving certificate both then use
            pass
        for case, body in bodies().items():
            path = work / f"{case}.json"
            path.write_bytes(body)
            runs: dict[str, list[dict[str, Any]]] = {"floor": [], "injector": []}
            for round_ in (1, 2):
                for server in (floor, injector):
                    with server.running():
                        wrk(url, path, work, connections=args.connections, duration=2, rate=None)
                        result = wrk(
                            url,
                            path,
                            work,
                            connections=args.connections,
                            duration=args.duration,
                            rate=None,
                        )
                    runs[server.name].append(result)
                    say(SCENARIO, f"{case} round {round_} {server.name}: {result['rps']} req/s")
            floor_max = median([r["rps"] for r in runs["floor"]])
            injector_max = median([r["rps"] for r in runs["injector"]])
            half = floor_max / 2
            half_runs: dict[str, dict[str, Any]] = {}
            for server in (floor, injector):
                with server.running():
                    half_runs[server.name] = wrk(
                        url,
                        path,
                        work,
                        connections=args.connections,
                        duration=args.duration,
                        rate=half,
                    )
                result = half_runs[server.name]
                say(
                    SCENARIO,
                    f"{case} half load {server.name}: {result['rps']} req/s, "
                    f"p50 {_ms(result['p50_us'])} ms, p99 {_ms(result['p99_us'])} ms",
                )
            cases[case] = {
                "body_bytes": len(body),
                "floor_max_rps": floor_max,
                "injector_max_rps": injector_max,
                "admission_vs_floor": round(injector_max / floor_max, 3),
                "max_rate_p50_ms": _ms(median([r["p50_us"] for r in runs["injector"]])),
                "max_rate_p99_ms": _ms(median([r["p99_us"] for r in runs["injector"]])),
                "half_load_target_rps": round(half, 1),
                "half_load_rps": half_runs["injector"]["rps"],
                "half_load_p50_ms": _ms(half_runs["injector"]["p50_us"]),
                "half_load_p99_ms": _ms(half_runs["injector"]["p99_us"]),
                "floor_half_load_p99_ms": _ms(half_runs["floor"]["p99_us"]),
                "runs": {"max": runs, "half_load": half_runs},
            }
            for name, runs_ in runs.items():
                if any(r["errors"] or r["non_2xx"] for r in runs_):
                    raise RuntimeError(f"{case}: {name} answered with errors: {runs_}")
    say(SCENARIO, f"in-process mutation time, median of {args.mutation_runs} runs")
    record["cases"] = cases
    record["in_process"] = measure_in_process(args.mutation_runs)
    bento = cases["bento"]
    record["admission_vs_floor"] = bento["admission_vs_floor"]
    record["admission_p99_ms_half_load"] = bento["half_load_p99_ms"]
    record["env_1500_in_process_us"] = record["in_process"]["env-1500"][
        "parse_decide_patch_encode_us"
    ]
    return record


def table(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for case, figures in record["cases"].items():
        rows.append(
            (
                f"{case} ({figures['body_bytes'] / 1000:.0f} KB) /mutate max rate",
                f"{figures['injector_max_rps']:.0f} req/s",
                f"{figures['admission_vs_floor']:.2f}x the floor ({figures['floor_max_rps']:.0f})",
            )
        )
        rows.append(
            (
                f"{case} at half the floor's max ({figures['half_load_target_rps']:.0f} req/s)",
                f"p99 {figures['half_load_p99_ms']:.2f} ms",
                f"p50 {figures['half_load_p50_ms']:.2f} ms, got {figures['half_load_rps']:.0f} "
                f"req/s (floor p99 {figures['floor_half_load_p99_ms']:.2f} ms)",
            )
        )
    for case, figures in record["in_process"].items():
        if isinstance(figures, dict):
            rows.append(
                (
                    f"{case} in-process parse+decide+patch+encode",
                    f"{figures['parse_decide_patch_encode_us']:.0f} us",
                    f"median of {record['in_process']['runs']}",
                )
            )
    return rows
