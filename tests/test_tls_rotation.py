"""Serving certificate rotation on a live listener: real TLS on loopback.

Clients open a new connection (a full handshake) per request while the
certificate is replaced again and again, sometimes with the files in the
worst order (a cert whose key is not written yet, as when cert-manager's
files change between two reads): no handshake may fail.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509

from injector.config import InjectorConfig, parse_config
from injector.lifecycle import SERVING
from injector.metrics import METRICS
from injector.pki.authority import issue_serving_cert
from injector.pki.cert_files import write_atomic
from injector.pki.serving import TLS, TlsState, prepare_tls, reload_if_changed
from injector.server import build_app

HOSTS = ["localhost", "127.0.0.1"]


@dataclass
class Live:
    port: int
    app: web.Application
    cert_dir: Path

    @property
    def tls(self) -> TlsState:
        return self.app[TLS]


def config_for(tmp_path: Path) -> InjectorConfig:
    return parse_config({"server": {"certDir": str(tmp_path / "certs")}})


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    app = build_app(config_for(tmp_path))
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock, ssl_context=app[TLS].context).start()
    app[SERVING].set()
    yield Live(sock.getsockname()[1], app, tmp_path / "certs")
    await runner.cleanup()


async def handshake_serial(port: int, ca: Path, server_name: str | None = "localhost") -> int:
    """One new connection: handshake, GET /healthz, the serial of the certificate served."""
    context = ssl.create_default_context(cafile=str(ca))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        response = await reader.read()
        assert response.startswith(b"HTTP/1.1 200"), response[:100]
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der).serial_number


def new_pair(cert_dir: Path, lifetime: dt.timedelta | None = None) -> tuple[bytes, bytes]:
    ca, ca_key = (cert_dir / "ca.crt").read_bytes(), (cert_dir / "ca.key").read_bytes()
    if lifetime is None:
        return issue_serving_cert(ca, ca_key, HOSTS)
    return issue_serving_cert(ca, ca_key, HOSTS, lifetime=lifetime)


def serial(cert_pem: bytes) -> int:
    return x509.load_pem_x509_certificate(cert_pem).serial_number


async def test_rotation_under_load_fails_no_handshake(live: Live) -> None:
    ca = live.cert_dir / "ca.crt"
    errors: list[BaseException] = []
    seen: set[int] = set()
    done = asyncio.Event()

    async def client() -> None:
        while not done.is_set():
            try:
                seen.add(await handshake_serial(live.port, ca, "localhost"))
                # No SNI at all (an IP address), as some clients connect.
                seen.add(await handshake_serial(live.port, ca, None))
            except Exception as err:
                errors.append(err)

    async def rotate() -> set[int]:
        issued = set()
        for round_ in range(40):
            cert_pem, key_pem = new_pair(live.cert_dir)
            issued.add(serial(cert_pem))
            if round_ % 2:
                # The worst order: the new cert first, a reload in between.
                write_atomic(live.cert_dir / "tls.crt", cert_pem, 0o644)
                reload_if_changed(live.tls, live.app[METRICS])
                await asyncio.sleep(0.01)
                write_atomic(live.cert_dir / "tls.key", key_pem)
            else:
                write_atomic(live.cert_dir / "tls.key", key_pem)
                write_atomic(live.cert_dir / "tls.crt", cert_pem, 0o644)
            reload_if_changed(live.tls, live.app[METRICS])
            await asyncio.sleep(0.02)
        return issued

    clients = [asyncio.create_task(client()) for _ in range(6)]
    try:
        issued = await rotate()
    finally:
        done.set()
        await asyncio.gather(*clients)
    assert errors == []
    assert len(seen & issued) >= 5, "the rotations should have been seen by the clients"
    assert serial((live.cert_dir / "tls.crt").read_bytes()) in seen | {
        await handshake_serial(live.port, ca)
    }


async def test_a_cert_without_its_key_never_reaches_a_handshake(live: Live) -> None:
    ca = live.cert_dir / "ca.crt"
    before = await handshake_serial(live.port, ca)
    cert_pem, key_pem = new_pair(live.cert_dir)
    write_atomic(live.cert_dir / "tls.crt", cert_pem, 0o644)  # its key is not there yet
    assert reload_if_changed(live.tls) is False
    assert await handshake_serial(live.port, ca) == before
    write_atomic(live.cert_dir / "tls.key", key_pem)
    assert reload_if_changed(live.tls) is True
    assert await handshake_serial(live.port, ca) == serial(cert_pem)


async def test_a_nearly_expired_certificate_is_renewed_and_served(live: Live) -> None:
    ca = live.cert_dir / "ca.crt"
    # Valid for six minutes in all (issued 5 minutes back), one left: due.
    cert_pem, key_pem = new_pair(live.cert_dir, lifetime=dt.timedelta(minutes=1))
    write_atomic(live.cert_dir / "tls.key", key_pem)
    write_atomic(live.cert_dir / "tls.crt", cert_pem, 0o644)
    assert reload_if_changed(live.tls) is True  # renewed before it was even served
    renewed = (live.cert_dir / "tls.crt").read_bytes()
    assert serial(renewed) != serial(cert_pem)
    expires = x509.load_pem_x509_certificate(renewed).not_valid_after_utc
    assert expires > dt.datetime.now(dt.UTC) + dt.timedelta(days=80)
    assert await handshake_serial(live.port, ca) == serial(renewed)
    assert live.tls.expires == expires
    assert reload_if_changed(live.tls) is False  # nothing more to do


def test_a_nearly_expired_leftover_is_renewed_at_start(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    first = prepare_tls(config)
    cert_pem, key_pem = new_pair(first.files.cert.parent, lifetime=dt.timedelta(minutes=1))
    write_atomic(first.files.key, key_pem)
    write_atomic(first.files.cert, cert_pem, 0o644)
    again = prepare_tls(config)
    assert again.expires is not None
    assert again.expires > dt.datetime.now(dt.UTC) + dt.timedelta(days=80)


def test_an_expired_certificate_is_due() -> None:
    from injector.pki.authority import generate_ca, needs_renewal

    ca, key = generate_ca()
    cert_pem, _ = issue_serving_cert(ca, key, HOSTS, lifetime=dt.timedelta(minutes=-1))
    assert needs_renewal(cert_pem)
    fresh, _ = issue_serving_cert(ca, key, HOSTS)
    assert not needs_renewal(fresh)
