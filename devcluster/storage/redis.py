"""Redis, the JuiceFS metadata engine: an admin user and a user that can only read.

    with Redis(tmp / "logs") as redis:
        redis.url(1)                     # the admin (the publisher's, read-write)
        redis.reader_url(1)              # a user that can only read (READER_COMMANDS)
        redis.command("SET", "k", "v", user=READER_USER, password=READER_PASSWORD)  # NOPERM

The `default` user with a password is the admin, whom only the publisher
gets; the reader, allowed only the commands `juicefs mount --read-only`
needs, is what tenants get. No anonymous access.
"""

from __future__ import annotations

import socket
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.ports import free_port
from devcluster.packages import PackagesError, ensure_packages
from devcluster.storage.service import LOOPBACK, Service, StorageError

# Redis: the `default` user is the admin, with this password; READER_USER can only read.
REDIS_PASSWORD = "bento-juicefs-redis-admin"
READER_USER = "jfs-reader"
READER_PASSWORD = "bento-juicefs-redis-reader"

# What `juicefs mount --read-only` (JuiceFS 1.4.2) sends a Redis metadata engine,
# measured with MONITOR while mounting, listing, reading, stat-ing and warming
# a volume: SELECT the db, GET (the format, attributes, counters), MGET
# (attributes of a directory's entries), HGET (a name in a directory),
# HSCAN (a directory's entries), LRANGE (a file's slices). Nothing else is
# needed: a read-only mount opens no session (no ZADD/HSET) and so never loads
# its Lua scripts (no SCRIPT LOAD, no EVALSHA: lookups fall back to HGET +
# GET). INFO and CLUSTER INFO are left out (server details, @dangerous): the
# mount then logs "parse info: NOPERM" once, treats the server as standalone
# and skips its maxmemory-policy check (which would try CONFIG SET).
READER_COMMANDS: tuple[str, ...] = ("select", "get", "mget", "hget", "hscan", "lrange")


class RedisUnavailable(StorageError):
    """redis-server is missing and cannot be installed here (tests skip on this)."""


class RedisReplyError(StorageError):
    """Redis answered a command with an error (e.g. `NOPERM ...` for a reader's write)."""


def find_redis_server() -> Path:
    """redis-server, installed from Debian's `redis-server` package when missing."""
    try:
        return ensure_packages({"redis-server": "redis-server"})["redis-server"]
    except PackagesError as err:
        raise RedisUnavailable(f"redis-server (the JuiceFS metadata engine): {err}") from err


class Redis(Service):
    """redis-server without persistence, on 127.0.0.1 and on `host` when that differs.

    No anonymous access: the `default` user (the admin) has `password`, and
    `reader` (user, password) may run READER_COMMANDS only, on any key
    (ACLs cannot tell Redis's numbered databases apart). Both are set from
    the command line, so a restart brings them back.
    """

    name = "redis"

    def __init__(
        self,
        log_dir: Path,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        binary: Path | None = None,
        password: str = REDIS_PASSWORD,
        reader: tuple[str, str] = (READER_USER, READER_PASSWORD),
    ) -> None:
        super().__init__(log_dir, host)
        self.port = port
        self.binary = binary
        self.password = password
        self.reader_user, self.reader_password = reader

    def _url(self, user: str, password: str, db: int) -> str:
        credentials = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
        return f"redis://{credentials}@{self.host}:{self.port}/{db}"

    def url(self, db: int = 1) -> str:
        """The admin's metadata URL (read-write): for the publisher only."""
        return self._url("default", self.password, db)

    def reader_url(self, db: int = 1) -> str:
        """The reader's metadata URL: what tenants get."""
        return self._url(self.reader_user, self.reader_password, db)

    def command(
        self,
        *args: str,
        user: str = "default",
        password: str | None = None,
        db: int | None = None,
        timeout: float = 5.0,
    ) -> Any:
        """One command on a fresh connection, as user (the admin by default), in db if given.

        Returns the decoded reply (str, int, None or a list); an error reply
        raises RedisReplyError with Redis's message (`NOPERM ...`).
        """
        secret = self.password if password is None else password
        requests: list[Sequence[str]] = [("AUTH", user, secret)]
        if db is not None:
            requests.append(("SELECT", str(db)))
        with (
            socket.create_connection((self.host, self.port), timeout=timeout) as sock,
            sock.makefile("rb") as stream,
        ):
            for request in [*requests, args]:
                sock.sendall(_resp_request(request))
                reply = _resp_reply(stream)
            return reply

    def ping(self) -> bool:
        try:
            return bool(self.command("PING", timeout=1) == "PONG")
        except (OSError, StorageError):
            return False

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        binary = self.binary or find_redis_server()
        self.port = self.port or free_port(self.host)
        workdir = self.log_dir / "redis-data"
        workdir.mkdir(parents=True, exist_ok=True)
        addresses = list(dict.fromkeys([LOOPBACK, self.host]))
        reads = [f"+{name}" for name in READER_COMMANDS]
        self._spawn(
            [
                str(binary),
                "--port",
                str(self.port),
                "--bind",
                *addresses,
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--dir",
                str(workdir),
                "--loglevel",
                "warning",
                # ACL rules: on, its password, every key, no pub/sub channel, commands.
                "--user",
                *("default", "reset", "on", f">{self.password}", "~*", "&*", "+@all"),
                "--user",
                *(self.reader_user, "reset", "on", f">{self.reader_password}", "~*"),
                *("resetchannels", "-@all", *reads),
            ]
        )
        self._wait_ready(self.ping, timeout, f"PING on {self.host}:{self.port}")


def _resp_request(args: Sequence[str]) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _resp_reply(stream: Any) -> Any:
    """One RESP2 reply from a binary file object."""
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("connection closed by Redis")
    kind, body = line[:1], line[1:-2].decode(errors="replace")
    if kind == b"+":
        return body
    if kind == b"-":
        raise RedisReplyError(body)
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data: bytes = stream.read(size + 2)
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_resp_reply(stream) for _ in range(count)]
    raise OSError(f"unexpected reply from Redis: {line[:80]!r}")
