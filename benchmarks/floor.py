"""The admission floor: a bare aiohttp handler that parses the body and allows, over the same TLS.

    python -m benchmarks.floor --cert-dir DIR --port PORT

What any Python webhook on aiohttp costs at least: the same TLS context as
the injector (`injector.pki.cert_files.server_ssl_context` on the injector's own
serving certificate), the same runner settings (`injector.server.make_runner`
and `TlsSite`: one process, one event loop, no access log, the same body
limit, timeouts and TLS buffers), the body read and parsed as JSON,
and a fixed "allowed" AdmissionReview response carrying the request's uid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from aiohttp import web

from injector.config import InjectorConfig
from injector.pki.cert_files import CertFiles, server_ssl_context
from injector.server import TlsSite, make_runner, shrink_tls_buffers


async def handle(request: web.Request) -> web.Response:
    review = json.loads(await request.read())
    response = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": review["request"]["uid"], "allowed": True},
    }
    return web.json_response(response, dumps=json.dumps)


async def serve(cert_dir: Path, host: str, port: int) -> None:
    server = InjectorConfig().server
    app = web.Application(client_max_size=server.max_body_bytes)
    app.router.add_post("/mutate", handle)
    config = InjectorConfig()
    runner = make_runner(app, config)  # the injector's runner settings and TLS buffers
    shrink_tls_buffers()
    files = CertFiles(
        cert_dir / server.cert_file, cert_dir / server.key_file, cert_dir / server.ca_file
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await runner.setup()
    try:
        site = TlsSite(
            runner,
            host,
            port,
            ssl_context=server_ssl_context(files),
            handshake_timeout=config.server.tls_handshake_timeout_seconds,
        )
        await site.start()
        print(f"floor serving on https://{host}:{port}/mutate", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cert-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.cert_dir, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
