"""The shaped store's parts that need no root: the link profile and the latency relay."""

from __future__ import annotations

import http.client
import http.server
import ipaddress
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.ports import free_port, port_answers
from common.processes import spawn_group, stop_group
from devcluster.storage.shaped_link import LinkProfile, StoreNetwork

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def relayed(tmp_path: Path) -> Iterator[int]:
    """A port on 127.0.0.1 that relays, with a 50 ms first-byte delay, to an HTTP server."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port()
    relay = spawn_group(
        [
            sys.executable,
            "-m",
            "devcluster.storage.latency",
            "--listen",
            f"127.0.0.1:{port}",
            "--to",
            f"127.0.0.1:{server.server_address[1]}",
            "--delay-ms",
            "50",
        ],
        tmp_path / "relay.log",
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        deadline = time.monotonic() + 10
        while not port_answers(port):
            assert relay.poll() is None, (tmp_path / "relay.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield port
    finally:
        stop_group(relay, 5)
        server.shutdown()
        server.server_close()


def test_link_profile() -> None:
    profile = LinkProfile(200, delay_ms=30)
    assert profile.rate_mbit == 1600
    assert profile.name == "200MBps+30ms"
    assert LinkProfile(100).name == "100MBps"
    command = LinkProfile(100).qdisc_commands("veth0")
    assert command[:4] == ["qdisc", "replace", "dev", "veth0"]
    assert command[command.index("rate") + 1] == "800mbit"


def test_store_network_addresses() -> None:
    net = StoreNetwork()
    assert net.host_ip == "172.31.214.1"
    assert net.redirect_rule(9000)[-1] == f"{net.store_ip}:9002"


def test_each_node_gets_a_link_of_its_own_clear_of_the_store_s_address() -> None:
    net = StoreNetwork()
    links = [net.node_link(index) for index in range(4)]
    assert links[0] == ("bjfs-st1", "172.31.214.4/30")
    assert links[1] == ("bjfs-st2", "172.31.215.4/30")
    assert len({veth for veth, _ in links}) == len({cidr for _, cidr in links}) == 4
    networks = [ipaddress.IPv4Network(cidr) for _, cidr in links]
    host_link = ipaddress.IPv4Network(net.host_link_cidr)
    for network in networks:
        assert ipaddress.IPv4Address(net.store_ip) not in network
        assert not network.overlaps(host_link)
    assert not any(a.overlaps(b) for i, a in enumerate(networks) for b in networks[i + 1 :])


def test_relay_delays_every_request_and_passes_the_bytes(relayed: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", relayed, timeout=10)
    try:
        for _ in range(2):  # one kept-alive connection: each request is held
            started = time.monotonic()
            conn.request("GET", "/object")
            response = conn.getresponse()
            body = response.read()
            elapsed = time.monotonic() - started
            assert response.status == 200
            assert body == PAYLOAD
            assert elapsed >= 0.05
    finally:
        conn.close()
