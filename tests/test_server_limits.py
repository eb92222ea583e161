"""Oversized bodies, slow clients and draining, against `serve` itself on loopback.

Every test runs the server as `python -m injector serve --standalone` does
(the same `serve`, its site, runner and timeouts) and talks to it over real
sockets. Slow clients are raw sockets that trickle bytes; nothing here
asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common.ports import free_port, port_answers
from injector.config import parse_config
from injector.server import raise_open_files_limit, serve
from tests.helpers import bento_pod

MAX_BODY = 64 * 1024


@dataclass
class Running:
    port: int
    ca: Path
    stop: asyncio.Event

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


StartServer = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[StartServer]:
    tasks: list[tuple[asyncio.Task[None], asyncio.Event]] = []

    async def start(**server: Any) -> Running:
        port = free_port()
        cert_dir = tmp_path / f"certs-{port}"
        config = parse_config(
            {
                "server": {
                    "host": "127.0.0.1",
                    "port": port,
                    "certDir": str(cert_dir),
                    "maxBodyBytes": MAX_BODY,
                    "shutdownDelaySeconds": 0,
                    **server,
                }
            }
        )
        stop = asyncio.Event()
        task = asyncio.create_task(serve(config, standalone=True, stop=stop))
        tasks.append((task, stop))
        for _ in range(400):
            if (cert_dir / "ca.crt").exists() and port_answers(port):
                return Running(port, cert_dir / "ca.crt", stop)
            if task.done():
                task.result()
            await asyncio.sleep(0.025)
        raise AssertionError("the server never started listening")

    yield start
    for _, stop in tasks:
        stop.set()
    await asyncio.gather(*(task for task, _ in tasks))


def review(name: str = "llama") -> bytes:
    request = {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE",
        "namespace": "serving",
        "object": bento_pod(name=name),
    }
    return json.dumps(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    ).encode()


async def tls_connect(
    server: Running,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", server.port, ssl=server.client_context(), server_hostname="localhost"
    )


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    fields = (line.partition(":") for line in lines[1:] if line)
    headers = {name.lower(): value.strip() for name, _, value in fields}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def closed_by_server(reader: asyncio.StreamReader, within: float = 60.0) -> bool:
    """Whether the server closes the connection (EOF or reset) before `within` seconds."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        pass
    return True


async def still_open(reader: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(0.05):
            data = await reader.read(1)
    except TimeoutError:
        return True
    except (ConnectionError, ssl.SSLError):
        return False
    return bool(data)


def post_head(length: int | None, *, chunked: bool = False) -> bytes:
    lines = ["POST /mutate HTTP/1.1", "Host: injector", "Content-Type: application/json"]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_a_huge_declared_body_gets_413_before_it_is_sent(start_server: StartServer) -> None:
    server = await start_server()
    reader, writer = await tls_connect(server)
    writer.write(post_head(10 << 30))  # 10 GiB declared, none of it sent
    await writer.drain()
    status, headers, body = await read_response(reader)
    assert status == 413
    assert b"server.maxBodyBytes" in body
    assert headers.get("connection") == "close"
    assert await closed_by_server(reader)
    writer.close()


async def test_an_oversized_chunked_body_gets_413(start_server: StartServer) -> None:
    server = await start_server()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 8192  # 320 KiB in all, chunked: no Content-Length to refuse early

    connector = aiohttp.TCPConnector(ssl=server.client_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        resp = await session.post(
            server.url + "/mutate", data=chunks(), headers={"Content-Type": "application/json"}
        )
        assert resp.status == 413
        assert "server.maxBodyBytes" in await resp.text()


async def test_a_body_that_trickles_gets_408(start_server: StartServer) -> None:
    server = await start_server(bodyTimeoutSeconds=0.5)
    reader, writer = await tls_connect(server)
    writer.write(post_head(1000) + b'{"apiVersion": ')
    await writer.drain()
    status, headers, body = await read_response(reader)
    assert status == 408
    assert b"server.bodyTimeoutSeconds" in body
    assert headers.get("connection") == "close"
    writer.close()


@dataclass
class SlowClients:
    silent: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
    headers: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
    bodies: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
    trickle: asyncio.Task[None]

    def all(self) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        return [*self.silent, *self.headers, *self.bodies]

    async def close(self) -> None:
        self.trickle.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.trickle
        for _, writer in self.all():
            writer.close()


async def slow_clients(server: Running, count: int) -> SlowClients:
    """count each of: TCP without a TLS handshake, headers a byte at a time, a slow body."""
    silent = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(count)]
    headers = [await tls_connect(server) for _ in range(count)]
    bodies = [await tls_connect(server) for _ in range(count)]
    head = post_head(5000)
    for _, writer in bodies:
        writer.write(head)

    async def trickle() -> None:
        for index in range(10_000):
            for _, writer in headers:
                if index < len(head) - 1:  # never the last byte
                    writer.write(head[index : index + 1])
            for _, writer in bodies:
                writer.write(b" ")
            await asyncio.sleep(0.2)

    return SlowClients(silent, headers, bodies, asyncio.create_task(trickle()))


async def normal_requests(server: Running, count: int) -> list[int]:
    connector = aiohttp.TCPConnector(ssl=server.client_context(), limit=20)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(index: int) -> int:
            async with session.post(
                server.url + "/mutate", data=review(f"pod-{index}"), headers=headers
            ) as resp:
                body = await resp.json()
                assert body["response"]["allowed"] is True
                return resp.status

        return list(await asyncio.gather(*(one(i) for i in range(count))))


async def test_slow_clients_do_not_hold_up_others(start_server: StartServer) -> None:
    """With 600 slow connections held open, normal reviews are answered all the same."""
    server = await start_server(
        idleTimeoutSeconds=120, bodyTimeoutSeconds=120, tlsHandshakeTimeoutSeconds=120
    )
    slow = await slow_clients(server, 200)
    try:
        assert await normal_requests(server, 200) == [200] * 200
        # The slow ones were still connected the whole time (nothing timed out yet).
        assert all(await asyncio.gather(*(still_open(reader) for reader, _ in slow.all())))
    finally:
        await slow.close()


async def test_slow_clients_are_disconnected(start_server: StartServer) -> None:
    """Each kind of slow client is closed by the server's own timeouts."""
    server = await start_server(
        idleTimeoutSeconds=1, bodyTimeoutSeconds=1, tlsHandshakeTimeoutSeconds=1
    )
    slow = await slow_clients(server, 20)
    try:
        closed = await asyncio.gather(*(closed_by_server(reader) for reader, _ in slow.all()))
        assert all(closed)
        # The server is still there for everybody else.
        assert await normal_requests(server, 20) == [200] * 20
    finally:
        await slow.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    start_server: StartServer,
) -> None:
    server = await start_server(idleTimeoutSeconds=1)
    reader, writer = await tls_connect(server)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 200
    assert headers.get("connection") != "close"
    assert await closed_by_server(reader)
    writer.close()


async def test_responses_close_their_connection_while_draining(start_server: StartServer) -> None:
    server = await start_server(shutdownDelaySeconds=2)
    reader, writer = await tls_connect(server)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    writer.write(request)
    _, headers, _ = await read_response(reader)
    assert headers.get("connection") != "close"  # kept alive while serving
    server.stop.set()
    await asyncio.sleep(0.2)
    writer.write(request)
    status, headers, _ = await read_response(reader)
    assert status == 200  # still answered while draining...
    assert headers.get("connection") == "close"  # ...and the client told to dial again
    assert await closed_by_server(reader)
    writer.close()


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"hard limit {hard}: nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        assert raise_open_files_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
