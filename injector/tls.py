"""The serving certificate: loaded (or generated) before the listener opens, kept fresh.

Changed files are reloaded into the live SSLContext, which affects new
handshakes only, so connections in flight are never dropped; a self-signed
serving certificate is re-issued from its CA before it expires.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from aiohttp import web

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
from injector.lifecycle import CleanupContext, background
from injector.metrics import METRICS, Metrics

log = structlog.get_logger("injector.tls")


@dataclass
class TlsState:
    files: CertFiles
    context: ssl.SSLContext
    stamp: tuple[float, float]
    ca_key: Path | None = None
    hosts: list[str] = field(default_factory=list)


TLS = web.AppKey("tls", TlsState)


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


async def _watch(state: TlsState, metrics: Metrics, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            reload_if_changed(state, metrics)
        except Exception as err:  # keep watching: a later pass may succeed
            log.warning("tls.check_failed", error=str(err))


def serving_certificate(
    config: InjectorConfig, extra_hosts: list[str] | None = None
) -> CleanupContext:
    """Put the serving certificate in app[TLS] at startup and keep it fresh until cleanup."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        state = prepare_tls(config, extra_hosts)
        app[TLS] = state
        interval = config.server.cert_check_interval_seconds
        async with background(_watch(state, app[METRICS], interval)):
            yield

    return context
