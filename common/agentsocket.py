"""What an unprivileged sidecar and its node agent say to each other over the pod's socket.

The node agent listens on a unix socket in the pod's own agent volume (an
emptyDir only the sidecar mounts), one socket per pod, so the socket itself
says which pod is talking: nothing a message says about identity is needed
or believed. The sidecar holds no Kubernetes credential; through this socket
it asks the agent to mount (the reply carries the `/dev/fuse` descriptor,
SCM_RIGHTS), to expose the Bento's models to the app containers, to post
its Events and to set its readiness condition, and to unmount on the way out.
In node cache mode it asks to `seal` instead of verifying: the agent opens
the gate itself from its own record of the Bento, verified once per node,
after checking every block is in the node cache (warming it first if cold).

Framing: one JSON object per line, each request answered by one reply line
`{"ok": true}` or `{"ok": false, "error": "..."}`; a seal's ok says
`"copy": true` when the node's verified local copy serves the pod's models
(the sidecar then asks only to `expose` them, and mounts no JuiceFS). The
agent parses every request as untrusted input (`parse_request`): a bad one
is answered with an error naming what was wrong, never acted on.
"""

from __future__ import annotations

import array
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

# Longest line either side accepts: an Event message is cut to 1 KiB anyway.
MAX_LINE = 16 * 1024
MAX_REASON = 64
MAX_MESSAGE = 1024

Op = Literal["mount", "expose", "seal", "event", "condition", "unmount"]
OPS: tuple[Op, ...] = get_args(Op)
EventType = Literal["Normal", "Warning"]
ConditionStatus = Literal["True", "False"]


# The ops that carry a kind, the field it travels in and the values it may take.
_KIND_FIELD: dict[str, tuple[str, tuple[str, ...]]] = {
    "event": ("type", get_args(EventType)),
    "condition": ("status", get_args(ConditionStatus)),
}


class ProtocolError(ValueError):
    """A line that is not a well-formed message; the text says what was wrong."""


@dataclass(frozen=True)
class Request:
    op: Op
    # event: Normal|Warning; condition: True|False.
    kind: str = ""
    reason: str = ""
    message: str = ""


def _reason(value: Any) -> str:
    # Event and condition reasons are CamelCase words (what the API takes as a reason).
    if not isinstance(value, str) or not value.isalnum() or not 0 < len(value) <= MAX_REASON:
        raise ProtocolError(f"reason must be 1-{MAX_REASON} letters or digits, got {value!r:.80}")
    return value


def _message(value: Any) -> str:
    if not isinstance(value, str):
        raise ProtocolError("message must be a string")
    return value[:MAX_MESSAGE]


def parse_request(line: bytes) -> Request:
    """One request line, checked; ProtocolError names what is wrong."""
    if len(line) > MAX_LINE:
        raise ProtocolError(f"request longer than {MAX_LINE} bytes")
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"not JSON: {err}") from None
    if not isinstance(data, dict):
        raise ProtocolError("a request is a JSON object")
    op = data.get("op")
    if op not in OPS:
        raise ProtocolError(f"op must be one of {', '.join(OPS)}, got {op!r:.80}")
    if op in _KIND_FIELD:
        field, allowed = _KIND_FIELD[op]
        kind = data.get(field)
        if kind not in allowed:
            raise ProtocolError(f"{op} {field} must be {' or '.join(allowed)}, got {kind!r:.80}")
        return Request(
            op, str(kind), _reason(data.get("reason")), _message(data.get("message", ""))
        )
    return Request(op)


def render_request(request: Request) -> bytes:
    body: dict[str, Any] = {"op": request.op}
    if request.op in _KIND_FIELD:
        field, _ = _KIND_FIELD[request.op]
        body |= {field: request.kind, "reason": request.reason, "message": request.message}
    return _line(body)


@dataclass(frozen=True)
class Reply:
    """The agent's answer: error None for ok, else why it refused."""

    error: str | None = None
    # A seal's ok only: the node's verified local copy serves the pod's models, so
    # `expose` alone shows them and the pod runs no JuiceFS client. An agent that
    # predates the field never sets it, and its sidecars ignore it.
    served_copy: bool = False


def render_reply(error: str | None = None, served_copy: bool = False) -> bytes:
    if error is not None:
        return _line({"ok": False, "error": error[:MAX_MESSAGE]})
    return _line({"ok": True, "copy": True} if served_copy else {"ok": True})


def parse_reply(line: bytes) -> Reply:
    """The agent's reply line (ProtocolError when it is not one)."""
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"the agent's reply is not JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        raise ProtocolError("the agent's reply has no ok field")
    if not data["ok"]:
        return Reply(str(data.get("error") or "refused"))
    return Reply(served_copy=data.get("copy") is True)


def _line(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


class LineBuffer:
    """Bytes in, whole lines out; a line past MAX_LINE is a ProtocolError."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        if len(self._pending) > MAX_LINE:
            raise ProtocolError(f"a line longer than {MAX_LINE} bytes")
        return lines


def send_with_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    """Send data and one descriptor in a single message (SCM_RIGHTS)."""
    fds = array.array("i", [fd])
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])


def receive_line_and_fd(sock: socket.socket) -> tuple[bytes, int | None]:
    """One reply line and the descriptor sent with it, if any (a blocking socket).

    The agent sends the line and the descriptor in one message, so the first
    recvmsg carries the descriptor; the line is read on until its newline.
    """
    fds = array.array("i")
    data, ancillary, _, _ = sock.recvmsg(MAX_LINE, socket.CMSG_SPACE(fds.itemsize))
    received: int | None = None
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if fds:
        received = fds[0]
    while not data.endswith(b"\n"):
        more = sock.recv(MAX_LINE)
        if not more:
            raise ConnectionError("the node agent closed the socket mid-reply")
        data += more
        if len(data) > MAX_LINE:
            raise ProtocolError(f"a reply longer than {MAX_LINE} bytes")
    return data, received


@contextmanager
def short_name(path: Path) -> Iterator[str]:
    """A name for path that fits a unix socket address (108 bytes).

    A pod's socket on the node lies under `<kubelet root>/pods/<uid>/volumes/
    kubernetes.io~empty-dir/<volume>/`, past the limit; bind and connect go
    through the directory's descriptor instead, `/proc/self/fd/N/<name>`.
    """
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)
