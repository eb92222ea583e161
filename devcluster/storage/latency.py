"""A TCP relay that adds an S3-like first-byte latency to every request it passes on.

This machine's kernel has no netem, so the delay is made here: each request
a client sends (the first bytes after the server last answered on that
connection) is held for `delay` before it goes to the server; response bytes
flow straight back, spliced through a pipe (no copy into Python), so the
relay costs little CPU at hundreds of MB/s. Every request's time to first
byte grows by the delay, as with S3's per-request latency, while the link
rate stays whatever shapes it (`devcluster.storage.shaped_link`).

    python -m devcluster.storage.latency --listen 172.31.214.10:9002 \
        --to 172.31.214.10:9000 --delay-ms 30

Run it inside the store's namespace; `shaped_link.StoreNetwork.delay_through`
redirects new connections to the store's port here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
import time

_PIPE_BYTES = 1 << 20


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class _Connection:
    """One client connection and its server connection, relayed by two threads."""

    def __init__(self, client: socket.socket, upstream: tuple[str, int], delay: float) -> None:
        self.client = client
        self.server = socket.create_connection(upstream)
        for sock in (self.client, self.server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.delay = delay
        self.answered = threading.Event()  # the server sent bytes since the last request
        self.answered.set()

    def requests(self) -> None:
        """Client to server: hold the first chunk of each request for the delay."""
        try:
            while data := self.client.recv(1 << 16):
                if self.answered.is_set():
                    self.answered.clear()
                    time.sleep(self.delay)
                self.server.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                self.server.shutdown(socket.SHUT_WR)

    def responses(self) -> None:
        """Server to client, spliced through a pipe."""
        read_end, write_end = os.pipe()
        try:
            src, dst = self.server.fileno(), self.client.fileno()
            while True:
                moved = os.splice(src, write_end, _PIPE_BYTES)
                if moved == 0:
                    break
                self.answered.set()
                while moved:
                    moved -= os.splice(read_end, dst, moved)
        except OSError:
            pass
        finally:
            os.close(read_end)
            os.close(write_end)
            with contextlib.suppress(OSError):
                self.client.shutdown(socket.SHUT_WR)

    def run(self) -> None:
        forward = threading.Thread(target=self.requests, daemon=True)
        forward.start()
        self.responses()
        forward.join()
        self.client.close()
        self.server.close()


def serve(listen: tuple[str, int], upstream: tuple[str, int], delay: float) -> None:
    with socket.create_server(listen, backlog=256, reuse_port=False) as server:
        print(f"relaying {listen} -> {upstream} with {delay * 1000:g} ms", flush=True)
        while True:
            client, _ = server.accept()
            try:
                connection = _Connection(client, upstream, delay)
            except OSError as err:
                print(f"upstream {upstream}: {err}", file=sys.stderr, flush=True)
                client.close()
                continue
            threading.Thread(target=connection.run, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--to", required=True, help="HOST:PORT of the server")
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(_address(args.listen), _address(args.to), args.delay_ms / 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
