"""The webhook server on loopback TLS (a real socket, a real handshake), and
the AdmissionReview bodies clients post to it."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path
from typing import Any

from aiohttp import web

from injector.config import InjectorConfig, parse_config
from injector.lifecycle import SERVING, ReadyCheck
from injector.pki.serving import TLS
from injector.server import build_app


def review_body(obj: dict[str, Any] | None, **overrides: Any) -> bytes:
    request: dict[str, Any] = {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE",
        "namespace": "serving",
        "object": obj,
        "dryRun": False,
    }
    request.update(overrides.pop("request", {}))
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    review.update(overrides)
    return json.dumps(review).encode()


def client_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


async def start(
    config: InjectorConfig, checks: list[ReadyCheck] | None = None
) -> tuple[web.AppRunner, web.Application, int]:
    app = build_app(config, checks)
    runner = web.AppRunner(app)
    await runner.setup()  # loads the serving certificate into app[TLS]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock, ssl_context=app[TLS].context)
    await site.start()
    app[SERVING].set()
    return runner, app, sock.getsockname()[1]


def server_config(tmp_path: Path, **server: Any) -> InjectorConfig:
    return parse_config(
        {"server": {"certDir": str(tmp_path / "certs"), "maxBodyBytes": 64 * 1024, **server}}
    )
