"""The webhook's HTTP side: the handlers and the app factory, and `serve`.

/mutate, /healthz, /readyz and /metrics. Everything long-lived that the app
needs (the serving certificate, the API client, the shared CA and caBundle
keeper, the namespace controller) starts and stops with the app as an aiohttp
cleanup context; see `build_app`.

Slow and hostile clients are bounded, never waited for: a TLS handshake
has `server.tlsHandshakeTimeoutSeconds`, a request's header must be complete
within `server.idleTimeoutSeconds` of the connection opening or of its last
response, its body within `server.bodyTimeoutSeconds` (408), and a body
larger than `server.maxBodyBytes` is refused (413) without being read. One
event loop serves every connection, so a slow one holds only its socket;
the file descriptor limit is raised to its hard limit at start so that
thousands of them do not run it out.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import resource
import signal
import ssl
import time
from dataclasses import dataclass

import structlog
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.exposition import generate_latest
from pydantic_core import to_json

from injector.admission import BadReview, parse_review, review
from injector.config import InjectorConfig
from injector.kube import api_client
from injector.lifecycle import DRAINING, READY_CHECKS, SERVING, ReadyCheck
from injector.metrics import METRICS, Metrics
from injector.namespaces import namespace_controller
from injector.pki.ca_keeper import shared_ca
from injector.pki.serving import TLS, serving_certificate
from injector.review_cache import ReviewCache

log = structlog.get_logger("injector.server")

CONFIG = web.AppKey("config", InjectorConfig)
REVIEWS = web.AppKey("reviews", ReviewCache)


@dataclass(frozen=True)
class ClusterAccess:
    """How to reach the cluster; without it the server is standalone (/mutate only)."""

    kubeconfig: str | None = None


def _text_error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", content_type="text/plain")


async def handle_mutate(request: web.Request) -> web.Response:
    app = request.app
    config, metrics = app[CONFIG], app[METRICS]
    started = time.perf_counter()
    structlog.contextvars.clear_contextvars()
    limit = config.server.max_body_bytes
    try:
        if (request.content_length or 0) > limit:
            raise web.HTTPRequestEntityTooLarge(limit, request.content_length or 0)
        async with asyncio.timeout(config.server.body_timeout_seconds):
            body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        metrics.requests.labels("too_large").inc()
        log.warning("admission.rejected", reason="body too large", limit=limit)
        response = _text_error(
            413,
            f"AdmissionReview body exceeds the configured limit of {limit} bytes "
            "(server.maxBodyBytes)",
        )
        response.force_close()  # the rest of the body is never read
        return response
    except TimeoutError:
        metrics.requests.labels("body_timeout").inc()
        seconds = config.server.body_timeout_seconds
        log.warning("admission.rejected", reason="body too slow", seconds=seconds)
        response = _text_error(
            408,
            f"AdmissionReview body not received within {seconds:g}s (server.bodyTimeoutSeconds)",
        )
        response.force_close()
        return response
    if request.content_type not in ("application/json", ""):
        metrics.requests.labels("bad_request").inc()
        return _text_error(400, f"content type {request.content_type} is not application/json")
    try:
        admission = parse_review(body)
    except BadReview as err:
        metrics.requests.labels("bad_request").inc()
        log.warning("admission.rejected", reason=str(err))
        return _text_error(400, str(err))

    req = admission.request
    meta = (req.object or {}).get("metadata") or {}
    structlog.contextvars.bind_contextvars(
        uid=req.uid,
        namespace=req.namespace,
        pod=meta.get("name") or req.name or (meta.get("generateName", "") + "*"),
        dry_run=req.dry_run,
    )
    try:
        # Replicas of one pod template differ only in the uid: decided once.
        reviews = app[REVIEWS]
        key, answer = reviews.get(body, req)
        if answer is None:
            answer = reviews.answer(review(req, config))
            reviews.put(key, answer)
        payload = answer.body(req.uid)
        outcome: str = answer.outcome
        log.info(
            "admission.decided",
            decision=outcome,
            reason=answer.reason,
            operations=answer.operations,
            warnings=list(answer.warnings) or None,
        )
    except Exception:
        # A bug must not half-mutate a pod or surface as a bare 500: deny
        # with a pointer to the log line that has the traceback.
        outcome = "error"
        log.exception("admission.failed")
        message = (
            f"JuiceFS model injection failed inside the injector; see its logs for uid {req.uid}"
        )
        payload = to_json(
            {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {
                    "uid": req.uid,
                    "allowed": False,
                    "status": {"code": 500, "message": message},
                },
            }
        )
    metrics.requests.labels(outcome).inc()
    metrics.latency.observe(time.perf_counter() - started)
    return web.Response(body=payload, content_type="application/json", charset="utf-8")


async def _close_when_draining(request: web.Request, response: web.StreamResponse) -> None:
    if request.app[DRAINING].is_set():
        response.force_close()
        response.headers[hdrs.CONNECTION] = "close"  # the headers are already prepared


async def handle_healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def handle_readyz(request: web.Request) -> web.Response:
    if not request.app[SERVING].is_set():
        return web.Response(status=503, text="not serving TLS yet\n")
    for check in request.app[READY_CHECKS]:
        problem = await check()
        if problem:
            return web.Response(status=503, text=problem + "\n")
    return web.Response(text="ok\n")


async def handle_metrics(request: web.Request) -> web.Response:
    payload = generate_latest(request.app[METRICS].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(
    config: InjectorConfig,
    ready_checks: list[ReadyCheck] | None = None,
    *,
    cluster: ClusterAccess | None = None,
    extra_hosts: list[str] | None = None,
) -> web.Application:
    """The webhook app; its parts start, in this order, when the app starts.

    With a cluster: the API client, then (self-signed and managing the
    caBundle) the shared CA, whose serving files the certificate then loads,
    then the namespace controller. Cleanup stops them in reverse order and
    closes the API client last.
    """
    app = web.Application(client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[REVIEWS] = ReviewCache()
    app[READY_CHECKS] = list(ready_checks or [])
    app[SERVING] = asyncio.Event()
    app[DRAINING] = asyncio.Event()
    app.on_response_prepare.append(_close_when_draining)
    app.router.add_post("/mutate", handle_mutate)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/metrics", handle_metrics)
    if cluster is not None:
        app.cleanup_ctx.append(api_client(cluster.kubeconfig))
        if config.server.self_signed and config.webhook.manage_ca_bundle:
            app.cleanup_ctx.append(shared_ca(config, extra_hosts))
    app.cleanup_ctx.append(serving_certificate(config, extra_hosts))
    if cluster is not None and config.controller.enabled:
        app.cleanup_ctx.append(namespace_controller(config))
    return app


class TlsSite(web.BaseSite):
    """aiohttp's TCPSite with a TLS handshake timeout (asyncio's default is 60 s)."""

    __slots__ = ("_handshake_timeout", "_host", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext,
        handshake_timeout: float,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host, self._port = host, port
        self._handshake_timeout = handshake_timeout

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self._handshake_timeout,
        )


def raise_open_files_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (as Go does); the limit now in force.

    Containers often start with a soft limit of 1024, which a thousand slow
    clients would use up, and then nobody could connect.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY:
        return soft
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


# After a refused body (413, 408) the rest is read and dropped this long, so the
# client gets to read the answer before the connection closes (aiohttp: 10 s).
LINGER_SECONDS = 2.0


# asyncio gives every TLS connection a 256 KiB receive buffer (and reads up to
# that much per call); a review is a few KB, and 500 connections then held
# 250+ MiB. TLS records are at most 16 KiB: 32 KiB loses nothing here.
TLS_READ_BUFFER = 32 * 1024


def shrink_tls_buffers(size: int = TLS_READ_BUFFER) -> None:
    """Per-connection TLS buffers of `size` (asyncio.sslproto's class default is 256 KiB)."""
    protocol = getattr(asyncio.sslproto, "SSLProtocol", None)
    if protocol is not None and isinstance(getattr(protocol, "max_size", None), int):
        protocol.max_size = size


def make_runner(app: web.Application, config: InjectorConfig) -> web.AppRunner:
    return web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=10.0,
        keepalive_timeout=config.server.idle_timeout_seconds,
        lingering_time=LINGER_SECONDS,
    )


def make_site(
    runner: web.AppRunner, config: InjectorConfig, host: str | None = None, port: int | None = None
) -> TlsSite:
    return TlsSite(
        runner,
        config.server.host if host is None else host,
        config.server.port if port is None else port,
        ssl_context=runner.app[TLS].context,
        handshake_timeout=config.server.tls_handshake_timeout_seconds,
    )


async def serve(
    config: InjectorConfig,
    *,
    kubeconfig: str | None = None,
    standalone: bool = False,
    extra_hosts: list[str] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the webhook until SIGTERM/SIGINT (or stop is set).

    Unless standalone, it also talks to the cluster: the shared CA Secret,
    the caBundle, and the namespace controller.
    """
    cluster = None if standalone else ClusterAccess(kubeconfig)
    app = build_app(config, cluster=cluster, extra_hosts=extra_hosts)
    runner = make_runner(app, config)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    open_files = raise_open_files_limit()
    shrink_tls_buffers()
    try:
        await runner.setup()
        await make_site(runner, config).start()
        app[SERVING].set()
        log.info(
            "server.started",
            host=config.server.host,
            port=config.server.port,
            standalone=standalone,
            open_files_limit=open_files,
        )
        await stop.wait()
        # Fail /readyz first and keep serving while endpoints catch up, so
        # the apiserver stops sending us reviews before the listener closes;
        # meanwhile every response closes its connection, so the apiserver's
        # next review dials again and reaches a replica that stays.
        app[SERVING].clear()
        app[DRAINING].set()
        log.info("server.draining", seconds=config.server.shutdown_delay_seconds)
        await asyncio.sleep(config.server.shutdown_delay_seconds)
    finally:
        log.info("server.stopping")
        # Finishes in-flight requests before closing, then stops the app's
        # parts in reverse order (whatever of them started, if startup failed).
        await runner.cleanup()
