"""Load: 10,000-review runs at high concurrency over TLS; errors, 5xx and the injector's memory.

One injector (`python -m injector serve --standalone`, default settings but
`server.certCheckIntervalSeconds: 0.2`, info logs to a file) on loopback,
and wrk (Debian's, one thread) POSTing AdmissionReviews of the example
Bento pod, each with its own uid and a label that makes every pod distinct
(so every review is decided, none answered from the cache of answers). Each
run stops once `--load-requests` responses have arrived; wrk's Lua checks
every 200 carries `"allowed":true` and a patch. The runs, in order:

1. `keep-alive` twice: `--load-connections` connections, kept alive. The
   injector's RSS (VmRSS of /proc/PID/status) is read when it is up and
   idle, after the first run and after the second: the first run's growth
   is warm-up (allocator arenas, caches filling), the second's what every
   further 10,000 reviews cost.
2. `handshake-each-rotating`: every review on a new connection (a full
   TLS handshake; `Connection: close`) while a new serving certificate is
   written every `--rotate-seconds`, and the injector picks each one up:
   wrk counts every failed handshake as a connect error.
3. `slow-clients`: the keep-alive run again while `--slow-connections`
   slow clients stay connected (a third open TCP and never start TLS, a
   third send their headers a byte every 0.5 s, a third a body a byte every
   0.5 s; each one that the injector's timeouts close is reopened).

4. `flood-large`: `--flood-connections` kept-alive connections POST
   reviews of a pod with thousands of env vars (`--flood-body-kib`, 900 KiB
   each, about 10 ms to parse) at full speed, as a hostile pod could, while
   a second client (one kept-alive connection, Python) sends
   `--flood-probes` small real reviews (the example pod) one after another,
   each timed. The injector decides the large ones in its worker threads
   and answers those past `server.maxReviewsInFlight` 429, so its event loop
   keeps answering the small ones: their slowest against the webhook
   timeout is the figure. The flood's 429s are its expected answer, not
   errors of the run.

Figures: reviews, errors (connect, read, write, timeout), non-2xx, wrong
answers, req/s, p50/p99 and RSS; and the slowest review of any run against
the apiserver's wait for the webhook (the shipped webhook configuration's
`timeoutSeconds`, 5 s; the chart's `webhook.timeoutSeconds`): every
run is a flood at full speed, and a real review queues behind it like any
other. Absolute times are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import http.client
import itertools
import json
import re
import signal
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks.admission import bento_pod, injector_record, injector_server, review_body
from benchmarks.record import say
from common.ports import free_port
from devcluster.packages import ensure_packages
from injector.pki.authority import issue_serving_cert, service_hosts
from injector.pki.cert_files import write_atomic

SCENARIO = "load"

# The MutatingWebhookConfiguration as shipped (the chart renders the same
# with its default webhook.timeoutSeconds: tests/test_chart.py).
WEBHOOK = Path(__file__).resolve().parent.parent / "manifests" / "base" / "webhook.yaml"


def webhook_timeout_seconds() -> int:
    """How long the apiserver waits for the injector: the shipped webhook's timeoutSeconds."""
    (hook,) = yaml.safe_load(WEBHOOK.read_text())["webhooks"]
    return int(hook["timeoutSeconds"])


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
%(close)s
local f = assert(io.open("%(body)s", "rb"))
local template = f:read("*a")
f:close()
local counter = 0
answered = 0
wrong = 0
local limit = %(limit)d
function request()
  counter = counter + 1
  local id = string.format("%%012d", counter)
  local body = template:gsub("@UID@", "3f1c1d2e-6b7a-4c51-9a7e-" .. id, 1)
  body = body:gsub("@VARIANT@", id, 1)
  return wrk.format(nil, nil, nil, body)
end
function response(status, headers, body)
  answered = answered + 1
  if status == 200 and not (string.find(body, '"allowed":true', 1, true)
      and string.find(body, '"patch":', 1, true)) then
    wrong = wrong + 1
  end
  if answered == limit then
    -- wrk's main thread sleeps out -d; the runner sees this file and sends SIGINT
    local flag = assert(io.open("%(flag)s", "w"))
    flag:close()
  end
end
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function done(summary, latency, requests)
  local e = summary.errors
  local bad = 0
  for _, t in ipairs(threads) do
    bad = bad + t:get("wrong")
  end
  io.write(string.format(
    '{"requests": %%d, "duration_us": %%d, "connect_errors": %%d, "read_errors": %%d, ' ..
    '"write_errors": %%d, "timeouts": %%d, "non_2xx": %%d, "wrong_answers": %%d, ' ..
    '"p50_us": %%d, "p99_us": %%d, "max_us": %%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    bad, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, MiB."""
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = round(int(value.split()[0]) / 1024, 1)
    return found


def metric(url: str, context: ssl.SSLContext, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", context=context, timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wrk(
    url: str,
    body: Path,
    work: Path,
    *,
    connections: int,
    limit: int,
    close: bool,
    flag: Path | None = None,
) -> dict[str, Any]:
    """One wrk run, interrupted (SIGINT: it prints its summary) once `limit` responses are in
    or whoever else holds `flag` creates it."""
    binary = ensure_packages({"wrk": "wrk"})["wrk"]
    stamp = time.monotonic_ns()
    script = work / f"load-{stamp}.lua"
    flag = flag or work / f"load-{stamp}.done"
    script.write_text(
        WRK_SCRIPT
        % {
            "body": str(body),
            "limit": limit,
            "flag": str(flag),
            "close": 'wrk.headers["Connection"] = "close"' if close else "",
        }
    )
    command = [
        str(binary),
        "-t1",
        f"-c{connections}",
        "-d600s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url + "/mutate",
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        deadline = time.monotonic() + 600
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    lines = [line for line in stdout.splitlines() if line.startswith('{"requests"')]
    if not flag.exists() or not lines:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {stdout}\n{stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["errors"] = sum(
        result[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    result["rps"] = round(result["requests"] / (result["duration_us"] / 1e6), 1)
    result["p50_ms"] = round(result["p50_us"] / 1000, 2)
    result["p99_ms"] = round(result["p99_us"] / 1000, 2)
    result["connections"] = connections
    return result


class Rotator(threading.Thread):
    """Writes a new serving certificate (key first) every `period` seconds until stopped."""

    def __init__(self, cert_dir: Path, period: float) -> None:
        super().__init__(daemon=True)
        self.cert_dir, self.period = cert_dir, period
        self.stopped = threading.Event()
        self.written = 0

    def run(self) -> None:
        hosts = service_hosts(
            "bento-juicefs-injector", "bento-juicefs-system", ["localhost", "127.0.0.1"]
        )
        ca = (self.cert_dir / "ca.crt").read_bytes()
        ca_key = (self.cert_dir / "ca.key").read_bytes()
        while not self.stopped.wait(self.period):
            cert_pem, key_pem = issue_serving_cert(ca, ca_key, hosts)
            write_atomic(self.cert_dir / "tls.key", key_pem)
            write_atomic(self.cert_dir / "tls.crt", cert_pem, 0o644)
            self.written += 1


# A slow client's request head: it promises a body it sends a byte at a time, or never.
SLOW_HEAD = (
    b"POST /mutate HTTP/1.1\r\nHost: injector\r\n"
    b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
)


class SlowClients(threading.Thread):
    """Keeps `count` slow connections open (reopening what the server closes)."""

    def __init__(self, port: int, context: ssl.SSLContext, count: int) -> None:
        super().__init__(daemon=True)
        self.port, self.context, self.count = port, context, count
        self.open = 0
        self.closed_by_server = 0
        self.failed_to_open = 0
        self._halt = threading.Event()
        self.ready = threading.Event()

    async def _connect(self, kind: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A plain TCP connection (kind 0) or a TLS one; None (counted) when refused."""
        try:
            if kind == 0:
                return await asyncio.open_connection("127.0.0.1", self.port)
            return await asyncio.open_connection(
                "127.0.0.1", self.port, ssl=self.context, server_hostname="localhost"
            )
        except (OSError, ssl.SSLError):
            self.failed_to_open += 1
            return None

    async def _dawdle(
        self, kind: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Until halted or closed: say nothing (0), a head a byte at a time (1), or a
        body a byte at a time (2); ConnectionResetError once the server closes."""
        sent = 0
        if kind == 2:
            writer.write(SLOW_HEAD)
        while not self._halt.is_set():
            if kind == 1 and sent < len(SLOW_HEAD) - 1:
                writer.write(SLOW_HEAD[sent : sent + 1])
                sent += 1
            elif kind == 2:
                writer.write(b" ")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    if not await reader.read(4096):
                        raise ConnectionResetError

    async def _one(self, kind: int) -> None:
        while not self._halt.is_set():
            connected = await self._connect(kind)
            if connected is None:
                await asyncio.sleep(0.5)
                continue
            reader, writer = connected
            self.open += 1
            try:
                await self._dawdle(kind, reader, writer)
            except (OSError, ssl.SSLError):
                if not self._halt.is_set():
                    self.closed_by_server += 1
            finally:
                self.open -= 1
                writer.close()

    async def _main(self) -> None:
        tasks = [asyncio.create_task(self._one(i % 3)) for i in range(self.count)]
        for _ in range(1200):  # until nearly all are open (at most 2 minutes)
            if self.open >= self.count * 0.95 or self._halt.is_set():
                break
            await asyncio.sleep(0.1)
        self.ready.set()
        await asyncio.to_thread(self._halt.wait)
        await asyncio.gather(*tasks, return_exceptions=True)

    def run(self) -> None:
        asyncio.run(self._main())

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


def _summary(name: str, result: dict[str, Any], rss: dict[str, float]) -> str:
    return (
        f"{name}: {result['requests']} reviews, {result['rps']} req/s, "
        f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, errors {result['errors']}, "
        f"non-2xx {result['non_2xx']}, wrong {result['wrong_answers']}; RSS {rss['VmRSS']} MiB"
    )


def _new_record(args: argparse.Namespace) -> dict[str, Any]:
    return injector_record(
        SCENARIO,
        args,
        {
            "load_generator": "wrk -t1 (Debian), Lua POST, stops after the given responses",
            "requests_per_run": args.load_requests,
            "connections": args.load_connections,
            "workload": "distinct pods (every review decided; none from the cache of answers)",
            "server": "python -m injector serve --standalone, TLS on 127.0.0.1, defaults "
            "but certCheckIntervalSeconds 0.2",
            "rotate_seconds": args.rotate_seconds,
            "slow_connections": args.slow_connections,
            "flood_connections": args.flood_connections,
            "flood_body_kib": args.flood_body_kib,
            "flood_probes": args.flood_probes,
        },
    )


@dataclasses.dataclass
class _Target:
    """The running injector, what every run POSTs, and where wrk works."""

    url: str
    body: Path
    work: Path
    context: ssl.SSLContext
    cert_dir: Path
    connections: int
    limit: int

    def wrk(self, *, close: bool) -> dict[str, Any]:
        return wrk(
            self.url,
            self.body,
            self.work,
            connections=self.connections,
            limit=self.limit,
            close=close,
        )

    def reloads(self) -> float:
        return metric(self.url, self.context, "bento_juicefs_certificate_reloads_total")


def _rotating_run(target: _Target, rotate_seconds: float) -> tuple[dict[str, Any], str]:
    """A handshake per review while the serving certificate is rewritten every period."""
    reloads = target.reloads()
    rotator = Rotator(target.cert_dir, rotate_seconds)
    rotator.start()
    try:
        result = target.wrk(close=True)
    finally:
        rotator.stopped.set()
        rotator.join()
    time.sleep(0.5)
    result["certificates_written"] = rotator.written
    result["certificates_loaded"] = int(target.reloads() - reloads)
    note = f"; {rotator.written} certificates written, {result['certificates_loaded']} loaded"
    return result, note


def _slow_clients_run(target: _Target, port: int, count: int) -> tuple[dict[str, Any], str]:
    """Kept-alive reviews while `count` slow clients hold connections open."""
    slow = SlowClients(port, target.context, count)
    slow.start()
    slow.ready.wait(120)
    try:
        held = slow.open
        result = target.wrk(close=False)
        result["slow_connections_open_at_start"] = held
        result["slow_connections_open_at_end"] = slow.open
    finally:
        slow.stop()
    result["slow_closed_by_server"] = slow.closed_by_server
    note = (
        f"; {held} slow connections held, {slow.closed_by_server} closed by the "
        "injector's timeouts (and reopened)"
    )
    return result, note


FLOOD = "flood-large"


def large_pod(target_bytes: int) -> dict[str, Any]:
    """The example's pod with env vars added to its app container until its review is
    about target_bytes: thousands of small objects, what makes a body slow to parse."""
    pod = copy.deepcopy(bento_pod())
    container = pod["spec"]["containers"][0]
    base = len(review_body(pod))
    entry = {"name": "FLOOD_000000", "value": "v" * 24}
    each = len(json.dumps(entry)) + 2  # and the ", " between entries
    count = max(0, (target_bytes - base) // each)
    container["env"] = [
        *container.get("env", []),
        *({"name": f"FLOOD_{i:06d}", "value": "v" * 24} for i in range(count)),
    ]
    return pod


class Prober(threading.Thread):
    """A second client: `count` small reviews, one at a time on one kept-alive connection,
    each timed from sending to the whole answer read (a new connection after an error)."""

    def __init__(self, port: int, context: ssl.SSLContext, template: bytes, count: int) -> None:
        super().__init__(daemon=True)
        self.port, self.context, self.template, self.count = port, context, template, count
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.wrong = 0

    def _one(self, conn: http.client.HTTPSConnection, index: int) -> None:
        variant = f"probe-{index:06d}".encode()
        body = self.template.replace(b"@UID@", b"6e0c7a2b-probe-" + variant, 1)
        body = body.replace(b"@VARIANT@", variant, 1)
        started = time.perf_counter()
        conn.request("POST", "/mutate", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = resp.read()
        self.latencies.append(time.perf_counter() - started)
        self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
        if resp.status == 200 and not (b'"allowed":true' in answer and b'"patch":' in answer):
            self.wrong += 1

    def run(self) -> None:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=10)
        for index in range(self.count):
            try:
                self._one(conn, index)
            except (OSError, http.client.HTTPException):
                self.errors += 1
                conn.close()
                conn = http.client.HTTPSConnection(
                    "127.0.0.1", self.port, context=self.context, timeout=10
                )
            time.sleep(0.01)  # a review every ~10 ms plus its own time: a busy apiserver
        conn.close()

    def figures(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        timeout = webhook_timeout_seconds()
        slowest = ordered[-1] if ordered else float("nan")
        return {
            "probes": self.count,
            "answered": len(ordered),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors,
            "wrong_answers": self.wrong,
            "p50_ms": round(statistics.median(ordered) * 1000, 2) if ordered else None,
            "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 2) if ordered else None,
            "slowest_s": round(slowest, 3),
            "slowest_vs_timeout": round(slowest / timeout, 3),
        }


def _flood_run(target: _Target, port: int, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Large reviews at full speed from wrk while a second client times small real ones."""
    large = target.work / "large.json"
    large.write_bytes(review_body(large_pod(args.flood_body_kib * 1024)))
    overloaded = 'bento_juicefs_admission_requests_total{outcome="overloaded"}'
    before = metric(target.url, target.context, overloaded)
    flag = target.work / f"flood-{time.monotonic_ns()}.done"
    prober = Prober(port, target.context, target.body.read_bytes(), args.flood_probes)
    flood: dict[str, Any] = {}

    def run_wrk() -> None:
        flood.update(
            wrk(
                target.url,
                large,
                target.work,
                connections=args.flood_connections,
                limit=10**9,
                close=False,
                flag=flag,
            )
        )

    flooding = threading.Thread(target=run_wrk, daemon=True)
    flooding.start()
    time.sleep(2)  # the flood at full speed before the first probe
    prober.start()
    prober.join()
    flag.touch()
    flooding.join(120)
    result = {**flood, "body_bytes": large.stat().st_size, "small_reviews": prober.figures()}
    result["overloaded_429"] = int(metric(target.url, target.context, overloaded) - before)
    small = result["small_reviews"]
    note = (
        f"; flood {result['body_bytes'] // 1024} KiB bodies, "
        f"{result['overloaded_429']} answered 429; small reviews meanwhile: "
        f"{small['answered']} of {small['probes']}, statuses {small['statuses']}, "
        f"errors {small['errors']}, p50 {small['p50_ms']} ms, p99 {small['p99_ms']} ms, "
        f"slowest {small['slowest_s']} s = {small['slowest_vs_timeout']}x the webhook timeout"
    )
    return result, note


def _totals(record: dict[str, Any], load_runs: int, log_text: str) -> None:
    """Errors and RSS growth across the runs, from record's runs and rss_mib."""
    rss = record["rss_mib"]
    # The flood's 429s and its large reviews' waits are its expected answer:
    # its figures are its own (record["runs"][FLOOD]), not the errors of the runs.
    runs = {name: r for name, r in record["runs"].items() if name != FLOOD}
    record["injector_log_errors"] = len(re.findall(r'"level": ?"(error|critical)"', log_text))
    total_errors = sum(r["errors"] + r["non_2xx"] + r["wrong_answers"] for r in runs.values())
    record["total_reviews"] = sum(r["requests"] for r in runs.values())
    record["total_errors_and_non_2xx"] = total_errors
    kept = [rss["idle"]["VmRSS"]] + [
        rss[f"keep-alive-{n}"]["VmRSS"] for n in range(1, load_runs + 1)
    ]
    # Per kept-alive run: the first is warm-up, the later ones what more reviews cost.
    record["rss_growth_per_run_mib"] = [round(b - a, 1) for a, b in itertools.pairwise(kept)]
    record["rss_growth_total_mib"] = round(rss["slow-clients"]["VmRSS"] - rss["idle"]["VmRSS"], 1)
    # A review under the flood against the apiserver's wait for the webhook: a
    # real review (the apiserver's) queues behind the flood's like any other.
    timeout = webhook_timeout_seconds()
    slowest = max(r["max_us"] for r in runs.values()) / 1e6
    record["webhook_timeout_s"] = timeout
    record["slowest_review_s"] = round(slowest, 3)
    record["slowest_vs_timeout"] = round(slowest / timeout, 3)


def run(args: argparse.Namespace) -> dict[str, Any]:
    record = _new_record(args)
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(tmp)
        port = free_port()
        cert_dir = work / "certs"
        body = work / "bento.json"
        body.write_bytes(review_body(bento_pod()))
        url = f"https://127.0.0.1:{port}"
        # The serving certificate is checked every 0.2 s (the rotating run replaces it).
        injector = injector_server(args, work, port, cert_dir, certCheckIntervalSeconds=0.2)
        with injector.running():
            assert injector.process is not None
            pid = injector.process.pid
            context = ssl.create_default_context(cafile=str(cert_dir / "ca.crt"))
            time.sleep(1)
            rss = {"idle": memory(pid)}
            say(SCENARIO, f"injector up, pid {pid}, RSS {rss['idle']['VmRSS']} MiB")
            target = _Target(
                url, body, work, context, cert_dir, args.load_connections, args.load_requests
            )
            for name in [f"keep-alive-{n}" for n in range(1, args.load_runs + 1)]:
                runs[name] = target.wrk(close=False)
                rss[name] = memory(pid)
                say(SCENARIO, _summary(name, runs[name], rss[name]))
            # One after the other: each run's RSS is read before the next starts.
            later: list[tuple[str, Callable[[], tuple[dict[str, Any], str]]]] = [
                ("handshake-each-rotating", lambda: _rotating_run(target, args.rotate_seconds)),
                ("slow-clients", lambda: _slow_clients_run(target, port, args.slow_connections)),
                (FLOOD, lambda: _flood_run(target, port, args)),
            ]
            for name, start in later:
                runs[name], note = start()
                rss[name] = memory(pid)
                say(SCENARIO, _summary(name, runs[name], rss[name]) + note)
            counts = _outcomes(url, context)
        log_text = (work / "injector.log").read_text(errors="replace")
    record["runs"] = runs
    record["rss_mib"] = rss
    record["injector_outcomes"] = counts
    _totals(record, args.load_runs, log_text)
    small = runs[FLOOD]["small_reviews"]
    failed_small = small["errors"] + small["wrong_answers"] + small["probes"] - small["answered"]
    failed_small += sum(n for status, n in small["statuses"].items() if status != "200")
    record["flood_small_reviews_failed"] = failed_small
    record["flood_slowest_small_review_s"] = small["slowest_s"]
    record["flood_slowest_small_vs_timeout"] = small["slowest_vs_timeout"]
    if record["total_errors_and_non_2xx"] or failed_small:
        total_errors = record["total_errors_and_non_2xx"] + failed_small
        say(SCENARIO, f"FAILED: {total_errors} errors, non-2xx or wrong answers")
    return record


def _outcomes(url: str, context: ssl.SSLContext) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", context=context, timeout=10) as resp:
        text = resp.read().decode()
    found = {}
    pattern = r'bento_juicefs_admission_requests_total\{outcome="(\w+)"\} (\S+)'
    for match in re.finditer(pattern, text):
        found[match.group(1)] = float(match.group(2))
    return found


def table(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for name, result in record["runs"].items():
        rss = record["rss_mib"][name]["VmRSS"]
        if name == FLOOD:
            small = result["small_reviews"]
            rows.append(
                (
                    f"{name}: {result['body_bytes'] // 1024} KiB reviews, "
                    f"{result['connections']} connections",
                    f"{result['rps']:.0f} req/s",
                    f"{result['overloaded_429']} answered 429 (non-2xx {result['non_2xx']}), "
                    f"errors {result['errors']}; RSS {rss} MiB",
                )
            )
            rows.append(
                (
                    f"small reviews during the flood ({small['answered']} of {small['probes']})",
                    f"{small['slowest_s']} s",
                    f"{small['slowest_vs_timeout']}x the {record['webhook_timeout_s']} s limit; "
                    f"p50 {small['p50_ms']} ms, p99 {small['p99_ms']} ms; "
                    f"statuses {small['statuses']}, errors {small['errors']}",
                )
            )
            continue
        rows.append(
            (
                f"{name}: {result['requests']} reviews, {result['connections']} connections",
                f"{result['rps']:.0f} req/s",
                f"errors {result['errors']}, non-2xx {result['non_2xx']}, "
                f"wrong {result['wrong_answers']}; p99 {result['p99_ms']} ms; RSS {rss} MiB",
            )
        )
    rows.append(
        (
            "slowest review of any run vs the webhook timeout",
            f"{record['slowest_review_s']} s",
            f"{record['slowest_vs_timeout']}x the {record['webhook_timeout_s']} s limit",
        )
    )
    idle = record["rss_mib"]["idle"]["VmRSS"]
    rows.append(
        (
            "injector RSS: idle -> after each run",
            f"{idle} MiB",
            " -> ".join(str(v["VmRSS"]) for k, v in record["rss_mib"].items() if k != "idle")
            + " MiB (growth per kept-alive run: "
            + ", ".join(f"{g:+}" for g in record["rss_growth_per_run_mib"])
            + " MiB)",
        )
    )
    return rows
