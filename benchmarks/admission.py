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
(about 78 KB). Every request has its own uid; two workloads each:
`distinct`, every request a different pod (a label differs), so the
injector decides each one; `replicas`, the same pod each time, as a
Deployment's replicas arrive (the injector answers those from its cache of
answers, `injector.review_cache`). Servers and load alternate, floor
first, in every round.
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

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open("%(body)s", "rb"))
local template = f:read("*a")
f:close()
local counter = 0
local distinct = %(distinct)s
function request()
  counter = counter + 1
  local id = string.format("%%012d", counter)
  local body = template:gsub("@UID@", "3f1c1d2e-6b7a-4c51-9a7e-" .. id, 1)
  body = body:gsub("@VARIANT@", distinct and id or "000000000000", 1)
  return wrk.format(nil, nil, nil, body)
end
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
    """The AdmissionReview, with placeholders wrk fills per request: @UID@ and @VARIANT@."""
    pod = {**pod, "metadata": {**pod["metadata"]}}
    metadata = pod["metadata"]
    metadata["labels"] = {**metadata.get("labels", {}), "bench-variant": "@VARIANT@"}
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "@UID@",
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


def server_versions() -> dict[str, Any]:
    """What the admission figures depend on: the server's packages and wrk's version."""
    return {
        **package_versions(["aiohttp", "pydantic", "structlog", "prometheus_client"]),
        "wrk": subprocess.run(
            [str(ensure_packages({"wrk": "wrk"})["wrk"]), "-v"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.splitlines()[0:1],
    }


def bodies() -> dict[str, bytes]:
    many = yaml.safe_load(MANY_ENV.read_text())
    return {"bento": review_body(bento_pod()), "env-1500": review_body(many)}


def injector_record(
    scenario: str, args: argparse.Namespace, settings: dict[str, Any]
) -> dict[str, Any]:
    """A new record of a run against the injector's server: its settings, the tree
    the injector runs from, and the versions the figures depend on."""
    record = new_record(scenario, {**settings, "injector_tree": str(args.injector_tree or REPO)})
    record["versions"] = server_versions()
    return record


class Server:
    """One HTTPS server process on loopback (injector or floor), started and stopped."""

    def __init__(self, name: str, args: list[str], port: int, log: Path, cwd: Path = REPO) -> None:
        self.name = name
        self.args = args
        self.port = port
        self.log = log
        self.cwd = cwd  # `python -m` imports from here first: another checkout's injector
        self.process: subprocess.Popen[bytes] | None = None

    @contextlib.contextmanager
    def running(self) -> Iterator[Server]:
        self.process = spawn_group(self.args, self.log, cwd=self.cwd, die_with_parent=True)
        try:
            deadline = time.monotonic() + 30
            while not port_answers(self.port):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start:\n{log_tail(self.log)}")
                time.sleep(0.1)
            yield self
        finally:
            stop_group(self.process, 15)


def injector_server(
    args: argparse.Namespace, work: Path, port: int, cert_dir: Path, **server: Any
) -> Server:
    """The injector's server, standalone, from the tree under test: TLS on
    127.0.0.1:port with its certificates in cert_dir, and the other server
    settings given; its config and log in work."""
    config = work / "config.yaml"
    settings = {"host": "127.0.0.1", "port": port, "certDir": str(cert_dir), **server}
    config.write_text(yaml.safe_dump({"server": settings}))
    return Server(
        "injector",
        [sys.executable, "-m", "injector", "serve", "--standalone", "--config", str(config)],
        port,
        work / "injector.log",
        cwd=args.injector_tree or REPO,
    )


def wrk(
    url: str,
    body: Path,
    work: Path,
    *,
    connections: int,
    duration: float,
    rate: float | None,
    distinct: bool,
) -> dict[str, Any]:
    """One wrk run; with rate, each connection waits its share of 1/rate between requests."""
    binary = ensure_packages({"wrk": "wrk"})["wrk"]
    delay = ""
    if rate:
        per_connection_ms = connections * 1000.0 / rate
        delay = f"function delay() return {per_connection_ms:.3f} end"
    script = work / f"wrk-{time.monotonic_ns()}.lua"
    script.write_text(
        WRK_SCRIPT % {"body": str(body), "delay": delay, "distinct": str(distinct).lower()}
    )
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
    result["workload"] = "distinct" if distinct else "replicas"
    if rate:
        result["target_rps"] = round(rate, 1)
    return result


def _ms(us: float) -> float:
    return round(us / 1000, 3)


def measure_case(
    args: argparse.Namespace, url: str, body: Path, work: Path, floor: Server, injector: Server
) -> dict[str, Any]:
    """Max rate (floor, then the injector per workload, twice) and half the floor's max."""
    case = body.stem
    maxima: dict[str, list[dict[str, Any]]] = {"floor": [], "distinct": [], "replicas": []}

    def load(rate: float | None, distinct: bool) -> dict[str, Any]:
        return wrk(
            url,
            body,
            work,
            connections=args.connections,
            duration=args.duration,
            rate=rate,
            distinct=distinct,
        )

    for round_ in (1, 2):
        with floor.running():
            wrk(url, body, work, connections=args.connections, duration=2, rate=None, distinct=True)
            maxima["floor"].append(load(None, True))
        for label in ("distinct", "replicas"):
            with injector.running():
                wrk(
                    url,
                    body,
                    work,
                    connections=args.connections,
                    duration=2,
                    rate=None,
                    distinct=True,
                )
                maxima[label].append(load(None, label == "distinct"))
        say(
            SCENARIO,
            f"{case} round {round_} max req/s: "
            + ", ".join(f"{k} {v[-1]['rps']}" for k, v in maxima.items()),
        )
    for label, runs in maxima.items():
        for result in runs:
            if result["errors"] or result["non_2xx"]:
                raise RuntimeError(f"{case} {label}: errors under load: {result}")
    floor_max = median([r["rps"] for r in maxima["floor"]])
    half = floor_max / 2
    with floor.running():
        floor_half = load(half, True)
    figures: dict[str, Any] = {
        "floor_max_rps": floor_max,
        "half_load_target_rps": round(half, 1),
        "floor_half_load_p50_ms": _ms(floor_half["p50_us"]),
        "floor_half_load_p99_ms": _ms(floor_half["p99_us"]),
        "runs": {"max": maxima, "floor_half_load": floor_half},
    }
    for label in ("distinct", "replicas"):
        with injector.running():
            half_run = load(half, label == "distinct")
        injector_max = median([r["rps"] for r in maxima[label]])
        figures[label] = {
            "injector_max_rps": injector_max,
            "admission_vs_floor": round(injector_max / floor_max, 3),
            "max_rate_p50_ms": _ms(median([r["p50_us"] for r in maxima[label]])),
            "max_rate_p99_ms": _ms(median([r["p99_us"] for r in maxima[label]])),
            "half_load_rps": half_run["rps"],
            "half_load_p50_ms": _ms(half_run["p50_us"]),
            "half_load_p99_ms": _ms(half_run["p99_us"]),
            "half_load_run": half_run,
        }
        say(
            SCENARIO,
            f"{case} {label}: {injector_max} req/s = {injector_max / floor_max:.2f}x the floor; "
            f"at {half:.0f} req/s p50 {_ms(half_run['p50_us'])} ms, "
            f"p99 {_ms(half_run['p99_us'])} ms (floor p99 {_ms(floor_half['p99_us'])} ms)",
        )
    return figures


def run(args: argparse.Namespace) -> dict[str, Any]:
    record = injector_record(
        SCENARIO,
        args,
        {
            "load_generator": "wrk -t1 (Debian), Lua POST of the AdmissionReview",
            "connections": args.connections,
            "duration_s": args.duration,
            "rounds": 2,
            "server": "one process, one event loop, TLS 1.2+ on 127.0.0.1, default settings",
            "injector_logs": "info (default), JSON lines to a file",
        },
    )
    cases: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-admission-") as tmp:
        work = Path(tmp)
        port = free_port()
        cert_dir = work / "certs"
        injector = injector_server(args, work, port, cert_dir)
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
            cases[case] = measure_case(args, url, path, work, floor, injector)
            cases[case]["body_bytes"] = len(body)
    say(SCENARIO, f"in-process mutation time, median of {args.mutation_runs} runs")
    record["cases"] = cases
    record["in_process"] = measure_in_process(args.mutation_runs)
    bento = cases["bento"]
    record["admission_vs_floor"] = bento["distinct"]["admission_vs_floor"]
    record["admission_p99_ms_half_load"] = bento["distinct"]["half_load_p99_ms"]
    record["admission_vs_floor_replicas"] = bento["replicas"]["admission_vs_floor"]
    record["admission_p99_ms_half_load_replicas"] = bento["replicas"]["half_load_p99_ms"]
    record["env_1500_in_process_us"] = record["in_process"]["env-1500"][
        "parse_decide_patch_encode_us"
    ]
    return record


def table(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for case, figures in record["cases"].items():
        size = f"{figures['body_bytes'] / 1000:.0f} KB"
        for label in ("distinct", "replicas"):
            line = figures[label]
            rows.append(
                (
                    f"{case} ({size}), {label} pods: /mutate max rate",
                    f"{line['injector_max_rps']:.0f} req/s",
                    f"{line['admission_vs_floor']:.2f}x the floor ({figures['floor_max_rps']:.0f})",
                )
            )
            rows.append(
                (
                    f"{case}, {label}: at half the floor's max "
                    f"({figures['half_load_target_rps']:.0f}/s)",
                    f"p99 {line['half_load_p99_ms']:.2f} ms",
                    f"p50 {line['half_load_p50_ms']:.2f} ms, got {line['half_load_rps']:.0f}/s "
                    f"(floor p99 {figures['floor_half_load_p99_ms']:.2f} ms)",
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
