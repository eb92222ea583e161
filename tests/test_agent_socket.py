"""The sidecar-agent socket protocol: what the agent accepts, and the descriptor it passes."""

from __future__ import annotations

import os
import socket

import pytest

from common.agentsocket import (
    MAX_LINE,
    MAX_MESSAGE,
    LineBuffer,
    ProtocolError,
    Reply,
    Request,
    parse_reply,
    parse_request,
    receive_line_and_fd,
    render_reply,
    render_request,
    send_with_fd,
)


@pytest.mark.parametrize(
    "request_",
    [
        Request("mount"),
        Request("expose"),
        Request("unmount"),
        Request("event", "Warning", "MountDied", "juicefs exited"),
        Request("condition", "True", "ModelsCached", "48 MiB verified"),
    ],
)
def test_requests_survive_the_round_trip(request_: Request) -> None:
    line = render_request(request_)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert parse_request(line.rstrip(b"\n")) == request_


@pytest.mark.parametrize(
    ("line", "names"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"op": "chmod"}', "op must be one of"),
        (b'{"op": "event", "type": "Error", "reason": "X"}', "Normal or Warning"),
        (b'{"op": "event", "type": "Normal", "reason": "a b"}', "reason must be"),
        (b'{"op": "event", "type": "Normal", "reason": ""}', "reason must be"),
        (b'{"op": "condition", "status": "Unknown", "reason": "X"}', "True or False"),
        (b'{"op": "condition", "status": "True", "reason": "X", "message": 3}', "message"),
        (b"x" * (MAX_LINE + 1), "longer than"),
    ],
)
def test_a_bad_request_is_refused_with_what_was_wrong(line: bytes, names: str) -> None:
    with pytest.raises(ProtocolError, match=names):
        parse_request(line)


def test_long_messages_are_cut() -> None:
    line = render_request(Request("event", "Normal", "Progress", "m" * 5000))
    assert len(parse_request(line).message) == MAX_MESSAGE


def test_replies() -> None:
    assert parse_reply(render_reply()) == Reply()
    assert parse_reply(render_reply("no room")) == Reply("no room")
    with pytest.raises(ProtocolError):
        parse_reply(b"{}")


def test_a_seal_reply_says_when_the_local_copy_serves() -> None:
    assert parse_reply(render_reply(served_copy=True)) == Reply(served_copy=True)
    # A refusal never claims a copy; an older agent's ok, or a bad field, is no copy.
    assert parse_reply(render_reply("short", served_copy=True)) == Reply("short")
    assert parse_reply(b'{"ok":true}') == Reply()
    assert parse_reply(b'{"ok":true,"copy":"yes"}') == Reply()


def test_line_buffer_joins_and_splits() -> None:
    lines = LineBuffer()
    assert lines.feed(b'{"op":') == []
    assert lines.feed(b'"mount"}\n{"op":"expose"}\n{"op"') == [
        b'{"op":"mount"}',
        b'{"op":"expose"}',
    ]
    with pytest.raises(ProtocolError, match="longer than"):
        lines.feed(b"x" * (MAX_LINE + 1))


def test_a_descriptor_crosses_with_its_reply() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    read_end, write_end = os.pipe()
    try:
        send_with_fd(left, render_reply(), write_end)
        line, fd = receive_line_and_fd(right)
        assert parse_reply(line) == Reply()
        assert fd is not None
        assert fd != write_end
        os.write(fd, b"through the passed descriptor")
        os.close(fd)
        assert os.read(read_end, 100) == b"through the passed descriptor"
    finally:
        for end in (read_end, write_end):
            os.close(end)
        left.close()
        right.close()
