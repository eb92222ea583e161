"""The unprivileged sidecar's line to its node agent: the pod's socket (common.agentsocket).

The sidecar holds no Kubernetes credential and no privilege: the agent
mounts for it (the reply to `mount` carries the /dev/fuse descriptor),
exposes the models to the app containers, and posts its Events and its
readiness condition. `AgentReporter` is the sidecar's `Reporter` over it.

One connection, one request at a time (a lock); blocking socket calls run
in a thread. A connection the agent dropped (it restarted) is made again on
the next request; the socket appears once the agent has seen the pod, which
may take until its next relist of the node's pods (10 s): the sidecar waits
for it up to 90 s rather than exit into the kubelet's restart backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from pathlib import Path

import structlog

from common.agentsocket import (
    Reply,
    Request,
    parse_reply,
    receive_line_and_fd,
    render_request,
    short_name,
)
from modelstore.mount import MountError

log = structlog.get_logger("sidecar.agent")

# What `kubectl describe pod` shows while no agent answers (the startup probe's output).
NO_AGENT = (
    "waiting for the bento-juicefs node agent to mount for this pod: is its DaemonSet "
    "running on this node? (kubectl -n bento-juicefs-system get pods -o wide)"
)


class AgentError(RuntimeError):
    """The agent refused a request, or could not be reached; the text says which."""


class AgentUnreachable(AgentError):
    """No agent answered (none runs on the node, or it restarted mid-request)."""


class AgentChannel:
    def __init__(
        self, path: Path, connect_timeout: float = 90.0, reply_timeout: float | None = 120.0
    ) -> None:
        self.path = path
        self._connect_timeout = connect_timeout
        # None: as long as the agent takes (a seal may warm a whole model first).
        self._reply_timeout = reply_timeout
        self._sock: socket.socket | None = None
        self._lock = asyncio.Lock()
        # Set by close(): a thread still waiting for the socket gives up at
        # once. asyncio.run waits for its threads on the way out, so one left
        # waiting for an agent that is not there would hold up the sidecar's
        # exit, and the pod's deletion, by up to connect_timeout.
        self._closing = threading.Event()

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self._connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with short_name(self.path) as name:
                    sock.connect(name)
            except (FileNotFoundError, ConnectionRefusedError) as err:
                sock.close()
                if time.monotonic() > deadline:
                    raise AgentUnreachable(f"{NO_AGENT} ({self.path}: {err.strerror})") from None
                if self._closing.wait(0.2):
                    raise AgentUnreachable(
                        f"{NO_AGENT} (given up: the sidecar is stopping)"
                    ) from None
                continue
            sock.settimeout(self._reply_timeout)
            return sock

    def _exchange(self, request: Request) -> tuple[Reply, int | None]:
        for attempt in (1, 2):
            if self._sock is None:
                self._sock = self._connect()
            try:
                self._sock.sendall(render_request(request))
                line, fd = receive_line_and_fd(self._sock)
                return parse_reply(line), fd
            except OSError:
                # The agent restarted: its old socket is gone; once more on a new one.
                self._drop()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def call(self, request: Request) -> int | None:
        """Send request, await the reply: the descriptor it carried (AgentError: refused)."""
        _, fd = await self._call(request)
        return fd

    async def _call(self, request: Request) -> tuple[Reply, int | None]:
        async with self._lock:
            try:
                reply, fd = await asyncio.to_thread(self._exchange, request)
            except OSError as err:
                raise AgentUnreachable(f"the node agent's socket {self.path}: {err}") from None
        if reply.error is not None:
            if fd is not None:
                socket.close(fd)
            raise AgentError(reply.error)
        return reply, fd

    async def mount(self) -> int:
        fd = await self.call(Request("mount"))
        if fd is None:
            raise AgentError("the node agent answered mount without a /dev/fuse descriptor")
        return fd

    async def expose(self) -> None:
        await self.call(Request("expose"))

    async def unmount(self) -> None:
        await self.call(Request("unmount"))

    async def seal(self) -> bool:
        """Have the agent open the gate from its seal of the Bento (node cache mode); whether
        the node's verified local copy serves the models (`expose` alone shows them)."""
        reply, _ = await self._call(Request("seal"))
        return reply.served_copy

    def sibling(self, reply_timeout: float | None) -> AgentChannel:
        """A second connection to the same agent (a long call must not hold up the rest)."""
        return AgentChannel(self.path, self._connect_timeout, reply_timeout)

    def close(self) -> None:
        """Done with the agent: the connection goes, and nothing waits for one any more."""
        self._closing.set()
        self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                # shutdown wakes a thread blocked reading a reply (close alone
                # does not), which asyncio.run would wait for on the way out.
                self._sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


class AgentMounts:
    """The model store's `FuseBroker` through the node agent: a refusal is a MountError."""

    def __init__(self, channel: AgentChannel) -> None:
        self._channel = channel

    async def mount(self) -> int:
        try:
            return await self._channel.mount()
        except AgentError as err:
            raise MountError(str(err)) from None

    async def expose(self) -> None:
        try:
            await self._channel.expose()
        except AgentError as err:
            raise MountError(f"exposing the models: {err}") from None

    async def unmount(self) -> None:
        try:
            await self._channel.unmount()
        except AgentError as err:
            raise MountError(str(err)) from None


class AgentReporter:
    """The sidecar's `Reporter` through its node agent: Events and the condition."""

    def __init__(self, channel: AgentChannel) -> None:
        self._channel = channel

    async def event(self, kind: str, reason: str, message: str) -> None:
        try:
            await self._channel.call(Request("event", kind, reason, message))
        except AgentError as err:
            log.warning("event.dropped", reason=reason, error=str(err))

    async def set_condition(
        self, status: str, reason: str, message: str, attempts: int | None = 8
    ) -> None:
        delay = 0.5
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._channel.call(Request("condition", status, reason, message))
                log.info("condition.set", status=status, reason=reason, via="node agent")
                return
            except AgentError as err:
                if attempts is not None and attempt >= attempts:
                    raise
                log.warning("condition.retry", error=str(err), attempt=attempt)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
