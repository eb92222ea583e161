"""The serving certificate: loaded (or generated) before the listener opens, kept fresh.

The listener's SSLContext never changes; for every handshake it hands the
connection to the context built from the newest good files (its SNI
callback, which OpenSSL calls with or without SNI). A reload builds a whole
new context and swaps it in only once the certificate and its key have
loaded together, so a half-written or mismatched pair (cert-manager's files
swapped between our two reads, a cert written before its key) never reaches
a handshake, and connections in flight keep the session they have. A
self-signed serving certificate is re-issued from its CA before it expires.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from aiohttp import web

from injector.config import InjectorConfig
from injector.lifecycle import CleanupContext, background
from injector.metrics import METRICS, Metrics
from injector.pki.authority import (
    generate_bundle,
    issue_serving_cert,
    needs_renewal,
    not_after,
    service_hosts,
)
from injector.pki.cert_files import CertFiles, server_ssl_context, write_atomic

log = structlog.get_logger("injector.tls")


@dataclass
class TlsState:
    files: CertFiles
    # What handshakes use: the newest context whose cert and key loaded together.
    current: ssl.SSLContext
    stamp: tuple[float, float]
    ca_key: Path | None = None
    hosts: list[str] = field(default_factory=list)
    expires: dt.datetime | None = None
    context: ssl.SSLContext = field(init=False)

    def __post_init__(self) -> None:
        # The listener's context: same settings, and each handshake goes to `current`.
        self.context = server_ssl_context(self.files)
        self.context.sni_callback = self._select

    def _select(
        self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        connection.context = self.current


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
    own_ca = ca_key if server.self_signed and ca_key.is_file() else None
    if own_ca is not None and needs_renewal(files.cert.read_bytes()):
        # Left from an earlier run and close to expiry: never start on it.
        _write_renewed(files, own_ca, hosts)
    stamp = files.stamp()
    return TlsState(
        files=files,
        current=server_ssl_context(files),
        stamp=stamp,
        ca_key=own_ca,
        hosts=hosts,
        expires=_expiry(files),
    )


def _expiry(files: CertFiles) -> dt.datetime | None:
    try:
        return not_after(files.cert.read_bytes())
    except (OSError, ValueError):
        return None


def renew_if_due(state: TlsState) -> bool:
    """Re-issue a self-signed serving cert from its CA when little of its life is left."""
    if state.ca_key is None or not needs_renewal(state.files.cert.read_bytes()):
        return False
    _write_renewed(state.files, state.ca_key, state.hosts)
    return True


def _write_renewed(files: CertFiles, ca_key: Path, hosts: list[str]) -> None:
    cert_pem, key_pem = issue_serving_cert(files.ca.read_bytes(), ca_key.read_bytes(), hosts)
    # Key before cert: a reader that sees the new cert finds its key.
    write_atomic(files.key, key_pem)
    write_atomic(files.cert, cert_pem, 0o644)
    log.info("tls.renewed", expires=not_after(cert_pem).isoformat())


def reload_if_changed(state: TlsState, metrics: Metrics | None = None) -> bool:
    """Renew a self-signed cert that is close to expiry; serve changed files.

    A new context is built from the files and swapped in whole; if the pair
    does not load (a cert without its key yet), the old one keeps serving and
    the next pass tries again.
    """
    renew_if_due(state)
    files = state.files
    stamp = files.stamp()  # before reading: a change after it is seen next pass
    if stamp == state.stamp:
        return False
    try:
        context = server_ssl_context(files)
    except (ssl.SSLError, OSError, ValueError) as err:
        log.warning("tls.reload_failed", error=str(err))
        return False
    state.current = context
    state.stamp = stamp
    state.expires = _expiry(files)
    if metrics is not None:
        metrics.cert_reloads.inc()
        if state.expires is not None:
            metrics.cert_expiry.set(state.expires.timestamp())
    log.info(
        "tls.reloaded",
        cert=str(files.cert),
        expires=state.expires.isoformat() if state.expires else None,
    )
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
        metrics = app[METRICS]
        if state.expires is not None:
            metrics.cert_expiry.set(state.expires.timestamp())
        interval = config.server.cert_check_interval_seconds
        async with background(_watch(state, metrics, interval)):
            yield

    return context


def write_serving_files(
    config: InjectorConfig, ca_pem: bytes, ca_key_pem: bytes, extra_hosts: list[str]
) -> CertFiles:
    cert_dir = Path(config.server.cert_dir)
    files = CertFiles(
        cert_dir / config.server.cert_file,
        cert_dir / config.server.key_file,
        cert_dir / config.server.ca_file,
    )
    hosts = service_hosts(config.webhook.service_name, config.webhook.namespace, extra_hosts)
    cert_pem, key_pem = issue_serving_cert(ca_pem, ca_key_pem, hosts)
    write_atomic(cert_dir / "ca.key", ca_key_pem)
    write_atomic(files.ca, ca_pem, 0o644)
    write_atomic(files.key, key_pem)
    write_atomic(files.cert, cert_pem, 0o644)
    return files
