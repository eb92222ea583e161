"""The HTTPS webhook server: /mutate, /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from injector.admission import BadReview, parse_review, review
from injector.certs import (
    CertFiles,
    generate_bundle,
    issue_serving_cert,
    needs_renewal,
    server_ssl_context,
    service_hosts,
    write_atomic,
)
from injector.config import InjectorConfig

log = structlog.get_logger("injector.server")

ReadyCheck = Callable[[], Awaitable[str | None]]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bento_juicefs_admission_requests",
            "AdmissionReview requests by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bento_juicefs_admission_duration_seconds",
            "Time to answer an AdmissionReview, body read to response",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.cert_reloads = Counter(
            "bento_juicefs_certificate_reloads",
            "Serving certificate reloads",
            registry=self.registry,
        )


@dataclass
class TlsState:
    files: CertFiles
    context: ssl.SSLContext
    stamp: tuple[float, float]
    ca_key: Path | None = None
    hosts: list[str] = field(default_factory=list)


CONFIG = web.AppKey("config", InjectorConfig)
METRICS = web.AppKey("metrics", Metrics)
READY_CHECKS = web.AppKey("ready_checks", list[ReadyCheck])
TLS = web.AppKey("tls", TlsState)
SERVING = web.AppKey("serving", asyncio.Event)


def _text_error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", content_type="text/plain")


async def handle_mutate(request: web.Request) -> web.Response:
    app = request.app
    config, metrics = app[CONFIG], app[METRICS]
    started = time.perf_counter()
    structlog.contextvars.clear_contextvars()
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        metrics.requests.labels("too_large").inc()
        limit = config.server.max_body_bytes
        log.warning("admission.rejected", reason="body too large", limit=limit)
        return _text_error(
            413,
            f"AdmissionReview body exceeds the configured limit of {limit} bytes "
            "(server.maxBodyBytes)",
        )
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
        result = review(req, config)
        response = result.response
        outcome: str = result.outcome
        log.info(
            "admission.decided",
            decision=outcome,
            reason=result.reason,
            operations=len(result.ops),
            warnings=result.warnings or None,
        )
    except Exception:
        # A bug must not half-mutate a pod or surface as a bare 500: deny
        # with a pointer to the log line that has the traceback.
        outcome = "error"
        log.exception("admission.failed")
        message = (
            f"JuiceFS model injection failed inside the injector; see its logs for uid {req.uid}"
        )
        response = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {
                "uid": req.uid,
                "allowed": False,
                "status": {"code": 500, "message": message},
            },
        }
    metrics.requests.labels(outcome).inc()
    metrics.latency.observe(time.perf_counter() - started)
    return web.json_response(response, dumps=json.dumps)


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


def reload_if_changed(state: TlsState, metrics: Metrics | None = None) -> bool:
    """Renew a self-signed cert that is close to expiry; reload changed files.

    Loading into the same SSLContext affects new handshakes only, so
    connections in flight keep their session and nothing is dropped.
    """
    files = state.files
    if state.ca_key is not None and needs_renewal(files.cert.read_bytes()):
        cert_pem, key_pem = issue_serving_cert(
            files.ca.read_bytes(), state.ca_key.read_bytes(), state.hosts
        )
        write_atomic(files.key, key_pem)
        write_atomic(files.cert, cert_pem, 0o644)
    stamp = files.stamp()
    if stamp == state.stamp:
        return False
    try:
        state.context.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as err:
        # A cert written before its key: keep serving the old pair, retry later.
        log.warning("tls.reload_failed", error=str(err))
        return False
    state.stamp = stamp
    if metrics is not None:
        metrics.cert_reloads.inc()
    log.info("tls.reloaded", cert=str(files.cert))
    return True


async def _watch_certs(app: web.Application) -> AsyncIterator[None]:
    interval = app[CONFIG].server.cert_check_interval_seconds

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            if TLS in app:
                try:
                    reload_if_changed(app[TLS], app[METRICS])
                except Exception as err:  # keep watching: a later pass may succeed
                    log.warning("tls.check_failed", error=str(err))

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build_app(
    config: InjectorConfig, ready_checks: list[ReadyCheck] | None = None
) -> web.Application:
    app = web.Application(client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[READY_CHECKS] = list(ready_checks or [])
    app[SERVING] = asyncio.Event()
    app.router.add_post("/mutate", handle_mutate)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/metrics", handle_metrics)
    app.cleanup_ctx.append(_watch_certs)
    return app


def prepare_tls(config: InjectorConfig, extra_hosts: list[str] | None = None) -> TlsState:
    """Load the serving certificate, generating a self-signed CA and cert if allowed."""
    server = config.server
    cert_dir = Path(server.cert_dir)
    files = CertFiles(
        cert_dir / server.cert_file, cert_dir / server.key_file, cert_dir / server.ca_file
    )
    ca_key = cert_dir / "ca.key"
    hosts = service_hosts(
        config.webhook.service_name,
        config.webhook.namespace,
        ["localhost", "127.0.0.1", *(extra_hosts or [])],
    )
    if not files.exists():
        if not server.self_signed:
            raise FileNotFoundError(
                f"no certificate at {files.cert} and {files.key}, and server.selfSigned is false "
                "(mount cert-manager's Secret there)"
            )
        bundle = generate_bundle(hosts)
        write_atomic(ca_key, bundle.ca_key_pem)
        files.write(bundle)
    return TlsState(
        files=files,
        context=server_ssl_context(files),
        stamp=files.stamp(),
        ca_key=ca_key if server.self_signed and ca_key.is_file() else None,
        hosts=hosts,
    )


class CaBundleKeeper:
    """Keeps our CA in the webhook configuration's caBundle; /readyz reads its verdict.

    A chart upgrade or a GitOps sync may reset the caBundle; re-patching on a
    timer heals that without a restart, and readiness reflects it meanwhile.
    """

    def __init__(self, api: Any, config: InjectorConfig, ca_pem: bytes) -> None:
        self._api, self._config, self._ca_pem = api, config, ca_pem
        self.problem: str | None = "caBundle not checked yet"
        self._checked = time.monotonic()

    async def check_once(self) -> None:
        from injector.cluster_certs import ca_bundle_problem, patch_ca_bundle

        try:
            await patch_ca_bundle(self._api, self._config, self._ca_pem)
            self.problem = await ca_bundle_problem(self._api, self._config, self._ca_pem)
            self._checked = time.monotonic()
        except Exception as err:
            log.warning("ca_bundle.check_failed", error=str(err))

    async def run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._config.webhook.ca_bundle_check_seconds)

    async def ready_check(self) -> str | None:
        # A verdict nobody could refresh for several periods is no verdict.
        stale_after = 5 * self._config.webhook.ca_bundle_check_seconds
        if time.monotonic() - self._checked > stale_after:
            return f"caBundle not checked for {stale_after:.0f}s (apiserver unreachable?)"
        return self.problem


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
    ready_checks: list[ReadyCheck] = []
    background: list[Coroutine[Any, Any, None]] = []
    if not standalone:
        from injector.cluster_certs import ensure_shared_ca, write_serving_files
        from injector.kube import new_api_client
        from injector.namespaces import NamespaceController

        api = await new_api_client(kubeconfig)
        if config.server.self_signed and config.webhook.manage_ca_bundle:
            ca_pem, ca_key_pem = await ensure_shared_ca(api, config)
            write_serving_files(
                config, ca_pem, ca_key_pem, ["localhost", "127.0.0.1", *(extra_hosts or [])]
            )
            keeper = CaBundleKeeper(api, config, ca_pem)
            await keeper.check_once()
            ready_checks.append(keeper.ready_check)
            background.append(keeper.run())
        if config.controller.enabled:
            background.append(NamespaceController(api, config).run())
    tls = prepare_tls(config, extra_hosts)
    app = build_app(config, ready_checks)
    app[TLS] = tls
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10.0)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, ssl_context=tls.context)
    await site.start()
    app[SERVING].set()
    tasks = [asyncio.create_task(coro) for coro in background]
    log.info(
        "server.started", host=config.server.host, port=config.server.port, standalone=standalone
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        # Fail /readyz first and keep serving while endpoints catch up, so
        # the apiserver stops sending us reviews before the listener closes.
        app[SERVING].clear()
        log.info("server.draining", seconds=config.server.shutdown_delay_seconds)
        await asyncio.sleep(config.server.shutdown_delay_seconds)
    finally:
        log.info("server.stopping")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Finishes in-flight requests before closing; new connections are refused.
        await runner.cleanup()
