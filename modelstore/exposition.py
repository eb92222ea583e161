"""The /metrics endpoint of the processes that run juicefs: the sidecar and the node agent.

Each serves its own registry and, after it, the metrics of the juicefs
processes it runs, relayed. juicefs serves those on 127.0.0.1 only (`--metrics`
at a free port), because its HTTP server is not one a tenant's network should
reach; the relay fetches exactly its /metrics text and passes on only the
`juicefs_` families, unchanged: names, types and labels (`vol_name`, `mp`) as
juicefs wrote them, so the stock JuiceFS Grafana dashboard's queries read them
from the pod's IP as from a juicefs of its own. The agent's juicefs processes
come and go with its warms; the families of several (one per volume or
Bento) are merged into one each, as the exposition format wants.

The server is plain HTTP on the pod's IP, a request per thread (a startup
probe's request may wait for the models meanwhile).
"""

from __future__ import annotations

import re
import socket
import socketserver
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from modelstore.sources import Counted, fetch_text

log = structlog.get_logger("modelstore.exposition")

JUICEFS_PREFIX = "juicefs_"
_SAMPLE_NAME = re.compile(r"^([a-zA-Z_:][\w:]*)")
_LABELS = re.compile(r"^[a-zA-Z_:][\w:]*(\{[^}]*\})?")
# What a family's samples may add to its name (histograms, summaries, counters).
_SUFFIXES = ("", "_bucket", "_sum", "_count", "_total", "_created")


def _of_family(sample: str, family: str) -> bool:
    """Whether sample names a series of family: its own name, or with a suffix above."""
    return sample.startswith(family) and sample[len(family) :] in _SUFFIXES


@dataclass
class Family:
    """One metric family of an exposition: its HELP and TYPE lines, then its samples."""

    name: str
    meta: list[str]
    samples: list[str]


def families(text: str) -> list[Family]:
    """Prometheus text (format 0.0.4) split into its families, in order.

    A sample belongs to the family whose HELP or TYPE line came last if its
    name is that family's (with a histogram's, summary's or counter's
    suffix); otherwise it starts a family of its own (untyped). Other
    comments and blank lines are dropped.
    """
    found: list[Family] = []
    current: Family | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
                continue
            if current is None or current.name != parts[2] or current.samples:
                current = Family(parts[2], [], [])
                found.append(current)
            current.meta.append(line)
            continue
        match = _SAMPLE_NAME.match(line)
        if match is None:
            continue
        name = match.group(1)
        if current is None or not _of_family(name, current.name):
            current = Family(name, [], [])
            found.append(current)
        current.samples.append(line)
    return found


def merge_expositions(texts: Iterable[str], prefix: str = JUICEFS_PREFIX) -> str:
    """The families named prefix... of several expositions as one exposition.

    A family several texts have is written once (the first HELP and TYPE),
    with the samples of all; a sample a text repeats (same name and labels)
    is kept once, the first.
    """
    merged: dict[str, Family] = {}
    seen: set[str] = set()
    for text in texts:
        for family in families(text):
            if not family.name.startswith(prefix):
                continue
            into = merged.setdefault(family.name, Family(family.name, family.meta, []))
            for sample in family.samples:
                key = _LABELS.match(sample)
                series = key.group(0) if key else sample
                if series not in seen:
                    seen.add(series)
                    into.samples.append(sample)
    lines = [line for f in merged.values() for line in (*f.meta, *f.samples)]
    return "".join(f"{line}\n" for line in lines)


class JuiceFSRelay:
    """The juicefs processes whose metrics an endpoint relays; safe across threads."""

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout
        self._sources: list[Counted] = []
        self._lock = threading.Lock()

    def add(self, source: Counted) -> None:
        with self._lock:
            self._sources.append(source)

    def remove(self, source: Counted) -> None:
        with self._lock:
            if source in self._sources:
                self._sources.remove(source)

    def text(self) -> str:
        """The juicefs families of every source that answers now, merged.

        A juicefs not started yet, being remounted or gone is left out of
        this scrape rather than failing it: the endpoint's own metrics say
        how the sidecar or the agent is doing meanwhile.
        """
        with self._lock:
            urls = [u for u in (s.metrics_url for s in self._sources) if u is not None]
        texts: list[str] = []
        for url in urls:
            try:
                texts.append(fetch_text(url, self.timeout))
            except OSError as err:  # urllib's URLError is an OSError
                log.debug("metrics.relay_skipped", url=url, error=str(err))
        return merge_expositions(texts)


def metrics_app(registry: CollectorRegistry, relay: JuiceFSRelay | None = None) -> WSGIApplication:
    """/metrics: the registry's metrics, then the relayed juicefs ones (text format 0.0.4,
    which both are written in; not OpenMetrics, which ends with `# EOF`)."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        body = generate_latest(registry)
        if relay is not None:
            body += relay.text().encode()
        headers = [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4), ("Content-Length", str(len(body)))]
        start_response("200 OK", headers)
        return [body]

    return app


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    """A request per thread: a startup probe's request waits for the models meanwhile."""

    daemon_threads = True


class _DualStackServer(_ThreadingServer):
    """IPv6 and IPv4 on one socket: the kubelet probes the pod's IP, whichever it is."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Not a line per scrape or probe on stderr: the processes log what they do themselves."""


def routed(default: WSGIApplication, routes: Mapping[str, WSGIApplication]) -> WSGIApplication:
    """A WSGI app sending each exact path of routes to its app, and every other to default."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return routes.get(environ.get("PATH_INFO") or "/", default)(environ, start_response)

    return app


def serve_http(
    port: int, host: str | None, app: WSGIApplication
) -> tuple[WSGIServer, threading.Thread]:
    """app on host:port in a daemon thread; OSError if it cannot bind.

    host None: every address of the pod, IPv6 and IPv4 alike where the pod
    has IPv6, else IPv4's (an IPv6-only cluster's kubelet could not reach a
    probe on 0.0.0.0).
    """
    if host is None:
        try:
            server: WSGIServer = make_server(
                "::", port, app, _DualStackServer, handler_class=_QuietHandler
            )
        except OSError:
            server = make_server(
                "0.0.0.0", port, app, _ThreadingServer, handler_class=_QuietHandler
            )
    else:
        server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return server, thread


@dataclass
class MetricsEndpoint:
    """The HTTP server behind /metrics (and the startup probe's path), in a thread of its own."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        port: int = self.server.server_address[1]
        return port

    def close(self) -> None:
        """Stop serving and release the port (blocks for up to the server's 0.5 s poll)."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def close_in_background(self) -> threading.Thread:
        """close() in a daemon thread, for a process on its way out: it does not wait for
        the server's poll, and exiting ends the thread wherever it is."""
        closer = threading.Thread(target=self.close, name="metrics-close", daemon=True)
        closer.start()
        return closer


def serve_metrics(
    registry: CollectorRegistry,
    port: int,
    host: str | None = None,
    relay: JuiceFSRelay | None = None,
    routes: Mapping[str, WSGIApplication] | None = None,
) -> MetricsEndpoint:
    """Serve registry (and relay) on host:port (port 0: one the kernel picks), and each
    path of routes by its own app; OSError if it cannot bind. host None: see serve_http."""
    server, thread = serve_http(port, host, routed(metrics_app(registry, relay), routes or {}))
    return MetricsEndpoint(server, thread)
