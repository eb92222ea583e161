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

Floods are bounded too. A review whose body is `server.offloadBodyBytes` or
more is parsed and decided in one of the app's worker threads, so the event
loop keeps answering /healthz and small reviews while it is decided; at
most `server.maxReviewsInFlight` of them are in a thread or queued for one
and as many being read (a large body is read only once it has a place),
and one past that waits `server.reviewQueueSeconds` for a place, then gets
429 with Retry-After (`injector.backpressure` has the two decisions).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import concurrent.futures
import contextlib
import functools
import resource
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, Gauge
from prometheus_client.exposition import generate_latest
from pydantic_core import to_json

from injector.admission import AdmissionRequest, BadReview, parse_review, review
from injector.backpressure import retry_after_seconds, where_to_decide
from injector.config import InjectorConfig
from injector.kube import api_client
from injector.lifecycle import DRAINING, READY_CHECKS, SERVING, ReadyCheck
from injector.metrics import METRICS, Metrics
from injector.namespaces import namespace_controller
from injector.pki.ca_keeper import shared_ca
from injector.pki.serving import TLS, serving_certificate
from injector.review_cache import Answer, ReviewCache

log = structlog.get_logger("injector.server")

CONFIG = web.AppKey("config", InjectorConfig)
REVIEWS = web.AppKey("reviews", ReviewCache)

T = TypeVar("T")

# Worker threads for large reviews. Deciding is pure Python and holds the GIL,
# so more threads would not decide faster, only take more turns from the event
# loop; two keep one slow review (a 3 MiB pod) from holding up every other.
REVIEW_THREADS = 2


class Overloaded(Exception):
    """No place among the reviews in flight freed up within the queue's wait."""


class ReviewWorkers:
    """The worker threads for large reviews, and the bound on reviews in them or queued for them.

    A place is taken before the work is handed over and given back when the
    thread is done with it (not when the awaiting handler is, which may be
    cancelled at shutdown first), so the bound holds for the threads' work.
    """

    def __init__(self, limit: int, threads: int, gauge: Gauge) -> None:
        self.limit = limit
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="review")
        self._places = asyncio.Semaphore(limit)
        self._reading = asyncio.Semaphore(limit)
        self._gauge = gauge

    @contextlib.asynccontextmanager
    async def reading(self, wait: float) -> AsyncIterator[None]:
        """One of `limit` places among the large bodies being read; Overloaded after wait s.

        Taken before a large body is read, so that a flood's bodies wait in
        the kernel's socket buffers (aiohttp stops reading a connection whose
        body nobody reads) rather than in the injector's memory: measured,
        100 connections of 900 KiB reviews read at once peaked at 562 MiB.
        """
        try:
            async with asyncio.timeout(wait):
                await self._reading.acquire()
        except TimeoutError:
            raise Overloaded from None
        try:
            yield
        finally:
            self._reading.release()

    async def run(self, work: Callable[[], T], wait: float) -> T:
        """work() in a worker thread once one of `limit` places is free; Overloaded after wait s."""
        try:
            async with asyncio.timeout(wait):
                await self._places.acquire()
        except TimeoutError:
            raise Overloaded from None
        self._gauge.inc()
        loop = asyncio.get_running_loop()

        def done(_: concurrent.futures.Future[T]) -> None:
            loop.call_soon_threadsafe(self._release)

        try:
            future = self.pool.submit(work)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(done)
        return await asyncio.wrap_future(future)

    def _release(self) -> None:
        self._gauge.dec()
        self._places.release()


WORKERS = web.AppKey("review_workers", ReviewWorkers)


async def review_workers(app: web.Application) -> AsyncIterator[None]:
    """app[WORKERS] from the config; at cleanup, waits for the threads (the requests are done)."""
    server = app[CONFIG].server
    workers = ReviewWorkers(server.max_reviews_in_flight, REVIEW_THREADS, app[METRICS].in_flight)
    app[WORKERS] = workers
    try:
        yield
    finally:
        await asyncio.to_thread(functools.partial(workers.pool.shutdown, cancel_futures=True))


@dataclass(frozen=True)
class ClusterAccess:
    """How to reach the cluster; without it the server is standalone (/mutate only)."""

    kubeconfig: str | None = None


def _text_error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", content_type="text/plain")


async def _read_body(request: web.Request) -> bytes | web.Response:
    """The request's body, or the error answer when it is too large or too slow."""
    config, metrics = request.app[CONFIG], request.app[METRICS]
    limit = config.server.max_body_bytes
    try:
        if (request.content_length or 0) > limit:
            raise web.HTTPRequestEntityTooLarge(limit, request.content_length or 0)
        async with asyncio.timeout(config.server.body_timeout_seconds):
            return await request.read()
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


@dataclass(frozen=True, slots=True)
class Decided:
    """A parsed request and its answer, or what review() raised instead."""

    request: AdmissionRequest
    answer: Answer | None
    error: Exception | None = None


def decide(body: bytes, config: InjectorConfig, reviews: ReviewCache) -> Decided:
    """Parse and answer body (from the cache of answers, or review()); BadReview if unparsable.

    The CPU work of a review and nothing else: no I/O, no logging, no
    metrics, so it runs as well in a worker thread as on the event loop (the
    handler logs, with the request's uid bound, once it has the result).
    """
    req = parse_review(body).request
    try:
        # Replicas of one pod template differ only in the uid: decided once.
        key, answer = reviews.get(body, req)
        if answer is None:
            answer = reviews.answer(review(req, config))
            reviews.put(key, answer)
    except Exception as err:
        return Decided(req, None, err)
    return Decided(req, answer)


def _overloaded(config: InjectorConfig, metrics: Metrics) -> web.Response:
    """HTTP 429 with Retry-After, for a review that found no place among those in flight.

    Not an AdmissionReview denial: a denial is final and names no fault of
    the pod, while client-go (with which the apiserver calls webhooks) waits
    out a 429's Retry-After and sends the review again within the webhook's
    timeout; only if every try finds the injector full does the call fail
    (failurePolicy: the pod is then refused, here by the sidecar-required policy).
    """
    limit = config.server.max_reviews_in_flight
    seconds = retry_after_seconds(config.server.review_queue_seconds)
    metrics.requests.labels("overloaded").inc()
    log.warning("admission.rejected", reason="overloaded", limit=limit)
    response = _text_error(
        429,
        f"the injector is overloaded: {limit} large AdmissionReviews are in flight "
        f"(server.maxReviewsInFlight); retry after {seconds}s",
    )
    response.headers[hdrs.RETRY_AFTER] = str(seconds)
    return response


def _decided_payload(decided: Decided) -> tuple[bytes, str]:
    """The AdmissionReview response and the outcome, logged with the request's uid bound."""
    req = decided.request
    meta = (req.object or {}).get("metadata") or {}
    structlog.contextvars.bind_contextvars(
        uid=req.uid,
        namespace=req.namespace,
        pod=meta.get("name") or req.name or (meta.get("generateName", "") + "*"),
        dry_run=req.dry_run,
    )
    answer = decided.answer
    if answer is not None:
        log.info(
            "admission.decided",
            decision=answer.outcome,
            reason=answer.reason,
            operations=answer.operations,
            warnings=list(answer.warnings) or None,
        )
        return answer.body(req.uid), answer.outcome
    # A bug must not half-mutate a pod or surface as a bare 500: deny
    # with a pointer to the log line that has the traceback.
    log.error("admission.failed", exc_info=decided.error)
    message = f"JuiceFS model injection failed inside the injector; see its logs for uid {req.uid}"
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
    return payload, "error"


async def handle_mutate(request: web.Request) -> web.Response:
    app = request.app
    config, metrics = app[CONFIG], app[METRICS]
    started = time.perf_counter()
    structlog.contextvars.clear_contextvars()
    large = where_to_decide(request.content_length or 0, config.server.offload_body_bytes)
    reading = (
        app[WORKERS].reading(config.server.review_queue_seconds)
        if large == "worker"
        else contextlib.nullcontext()
    )
    try:
        async with reading:
            body = await _read_body(request)
    except Overloaded:
        response = _overloaded(config, metrics)
        response.force_close()  # its body was never read
        return response
    if isinstance(body, web.Response):
        return body
    if request.content_type not in ("application/json", ""):
        metrics.requests.labels("bad_request").inc()
        return _text_error(400, f"content type {request.content_type} is not application/json")
    try:
        if where_to_decide(len(body), config.server.offload_body_bytes) == "inline":
            decided = decide(body, config, app[REVIEWS])
        else:
            work = functools.partial(decide, body, config, app[REVIEWS])
            decided = await app[WORKERS].run(work, config.server.review_queue_seconds)
    except BadReview as err:
        metrics.requests.labels("bad_request").inc()
        log.warning("admission.rejected", reason=str(err))
        return _text_error(400, str(err))
    except Overloaded:
        return _overloaded(config, metrics)
    payload, outcome = _decided_payload(decided)
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
    app.cleanup_ctx.append(review_workers)
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
