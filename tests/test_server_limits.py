"""Oversized bodies, slow clients, floods and draining, against `serve` itself on loopback.

Every test runs the server as `python -m injector serve --standalone` does
(the same `serve`, its site, runner and timeouts) and talks to it over real
sockets. Slow clients are raw sockets that trickle bytes; nothing here
asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common.ports import free_port, port_answers
from injector import server as server_module
from injector.admission import AdmissionRequest, ReviewResult
from injector.admission import review as decide_review
from injector.config import InjectorConfig, parse_config
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


# ---- floods: large reviews in worker threads, and the bound on them ----


class Held:
    """review() made to wait, in its worker thread, for pods named hold-*, until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

        def held(request: AdmissionRequest, config: InjectorConfig) -> ReviewResult:
            name = ((request.object or {}).get("metadata") or {}).get("name", "")
            if name.startswith("hold-"):
                self.entered.release()
                self.release.wait(60)
            return decide_review(request, config)

        monkeypatch.setattr(server_module, "review", held)

    async def wait_entered(self, count: int) -> None:
        """Until count held reviews are inside review(), in their threads."""
        for _ in range(count):
            assert await asyncio.to_thread(self.entered.acquire, True, 60)


def large_review(name: str, pad: int = 100 * 1024) -> bytes:
    """A review of a pod whose annotation makes its body pad bytes larger."""
    request = json.loads(review(name))
    request["request"]["object"]["metadata"].setdefault("annotations", {})["padding"] = "x" * pad
    return json.dumps(request).encode()


async def post(
    session: aiohttp.ClientSession, server: Running, body: bytes
) -> tuple[int, dict[str, str], str]:
    async with session.post(
        server.url + "/mutate", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        return resp.status, dict(resp.headers), await resp.text()


def outcome_count(metrics: str, outcome: str) -> float:
    match = re.search(
        rf'^bento_juicefs_admission_requests_total\{{outcome="{outcome}"\}} (\S+)$',
        metrics,
        re.MULTILINE,
    )
    return float(match[1]) if match else 0.0


async def test_reviews_past_the_bound_get_429_and_are_counted(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two reviews in workers fill a bound of two; three more wait, then get 429 (Retry-After)."""
    held = Held(monkeypatch)
    server = await start_server(maxReviewsInFlight=2, reviewQueueSeconds=0.2, offloadBodyBytes=0)
    connector = aiohttp.TCPConnector(ssl=server.client_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            holding = [
                asyncio.create_task(post(session, server, review(f"hold-{i}"))) for i in range(2)
            ]
            await held.wait_entered(2)
            extra = await asyncio.gather(
                *(post(session, server, review(f"extra-{i}")) for i in range(3))
            )
            async with session.get(server.url + "/metrics") as resp:
                metrics = await resp.text()
        finally:
            held.release.set()
        for status, headers, text in extra:
            assert status == 429
            assert headers["Retry-After"] == "1"
            assert "the injector is overloaded" in text
            assert "server.maxReviewsInFlight" in text
        assert outcome_count(metrics, "overloaded") == 3
        assert "bento_juicefs_admission_reviews_in_flight 2.0" in metrics
        # The two that held their places are answered once released, as usual.
        for status, _, text in await asyncio.gather(*holding):
            assert status == 200
            assert json.loads(text)["response"]["allowed"] is True
        async with session.get(server.url + "/metrics") as resp:
            metrics = await resp.text()
        assert "bento_juicefs_admission_reviews_in_flight 0.0" in metrics
        # And the next review finds a place.
        status, _, _ = await post(session, server, review("after"))
        assert status == 200


async def test_a_large_body_is_read_only_once_it_has_a_place(start_server: StartServer) -> None:
    """One large body being read fills a bound of one: the next large one is not read but
    answered 429 and its connection closed; a small review needs no place and is answered."""
    server = await start_server(
        maxReviewsInFlight=1,
        reviewQueueSeconds=0.2,
        offloadBodyBytes=1024,
        bodyTimeoutSeconds=30,
        maxBodyBytes=1024 * 1024,
    )
    _, slow_writer = await tls_connect(server)
    slow_writer.write(post_head(100_000) + b'{"apiVersion": ')  # holds the place, reading
    await slow_writer.drain()
    await asyncio.sleep(0.2)
    try:
        reader, writer = await tls_connect(server)
        body = large_review("waits")
        writer.write(post_head(len(body)) + body)
        await writer.drain()
        status, headers, text = await read_response(reader)
        assert status == 429
        assert headers.get("connection") == "close"
        assert b"server.maxReviewsInFlight" in text
        writer.close()
        connector = aiohttp.TCPConnector(ssl=server.client_context())
        async with aiohttp.ClientSession(connector=connector) as session:
            status, _, _ = await post(session, server, review("small"))
            assert status == 200
    finally:
        slow_writer.close()


async def test_the_event_loop_answers_while_a_large_review_is_decided(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a large review held in its worker thread, /healthz and small reviews are answered."""
    held = Held(monkeypatch)
    server = await start_server(maxBodyBytes=1024 * 1024)
    connector = aiohttp.TCPConnector(ssl=server.client_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            big = asyncio.create_task(post(session, server, large_review("hold-big")))
            await held.wait_entered(1)
            async with session.get(server.url + "/healthz") as resp:
                assert resp.status == 200
            status, _, text = await post(session, server, review("small"))
            assert status == 200
            assert json.loads(text)["response"]["allowed"] is True
            assert not big.done()  # still held: the small one did not wait for it
        finally:
            held.release.set()
        status, _, text = await big
        assert status == 200
        answer = json.loads(text)["response"]
        assert answer["allowed"] is True
        assert answer["patch"]


async def test_a_large_review_that_fails_inside_is_denied_with_its_uid(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in the worker thread is the same denial as on the event loop, never a 500."""

    def broken(request: AdmissionRequest, config: InjectorConfig) -> ReviewResult:
        raise RuntimeError("a bug")

    monkeypatch.setattr(server_module, "review", broken)
    server = await start_server(maxBodyBytes=1024 * 1024)
    connector = aiohttp.TCPConnector(ssl=server.client_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        status, _, text = await post(session, server, large_review("big"))
    assert status == 200
    answer = json.loads(text)["response"]
    assert answer["allowed"] is False
    assert "failed inside the injector" in answer["status"]["message"]
    assert answer["uid"] in answer["status"]["message"]
