"""What the sidecar needs to tell the cluster: an interface, so decisions and tests need no API.

`sidecar.agent.AgentReporter` is the real one (Events and the pod condition
through the node agent, which posts them: the sidecar holds no Kubernetes
credential); tests pass fakes that record what they are told.
`OrderedReporter` wraps one so that the apiserver never holds up the mount
or the model stream: Events go out in the background, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

log = structlog.get_logger("sidecar")

NORMAL, WARNING = "Normal", "Warning"


class Reporter(Protocol):
    async def event(self, kind: str, reason: str, message: str) -> None:
        """Send an Event about the pod; never raises (a lost Event is logged)."""
        ...

    async def set_condition(
        self, status: str, reason: str, message: str, attempts: int | None = 8
    ) -> None:
        """Set the readiness condition; retried, attempts=None until cancelled."""
        ...


@dataclass
class _Item:
    call: Callable[[], Awaitable[None]]
    done: asyncio.Future[None] | None = None  # None: nobody waits for it
    running: asyncio.Task[None] | None = None


@dataclass
class OrderedReporter:
    """A Reporter whose Events never wait for the apiserver, and whose calls keep their order.

    Each Event to an unreachable apiserver costs its request timeout (10 s);
    awaited inline, a few of them held the mount and the model stream up by
    as much while the apiserver was away. Here `event()` queues and returns
    at once; one sender delivers Events and conditions in the order they
    were made, so a condition set later can never be overtaken by one set
    earlier (an informational Mounting=False landing after True would shut
    the gate again). `set_condition()` waits until its own call is done
    (and raises what it raised); `post_condition()` does not wait.
    """

    inner: Reporter
    # Events beyond this many unsent are dropped (the oldest kept: they say what happened first).
    limit: int = 200
    dropped: int = 0
    _queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    _sender: asyncio.Task[None] | None = None

    def _put(self, item: _Item) -> None:
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_all())
        self._queue.put_nowait(item)

    async def _send_all(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                if item.done is None or not item.done.done():  # done already: its caller left
                    await self._send(item)
            finally:
                self._queue.task_done()

    @staticmethod
    async def _send(item: _Item) -> None:
        item.running = asyncio.ensure_future(item.call())
        try:
            await item.running
        except asyncio.CancelledError:
            sender = asyncio.current_task()
            if item.done is not None and not item.done.done():
                item.done.cancel()
            if sender is not None and sender.cancelling():
                item.running.cancel()
                raise  # the sender itself is being stopped
            # Only the call was cancelled (its caller gave up): go on with the next.
        except Exception as err:
            if item.done is not None and not item.done.done():
                item.done.set_exception(err)
        else:
            if item.done is not None and not item.done.done():
                item.done.set_result(None)

    async def event(self, kind: str, reason: str, message: str) -> None:
        if self._queue.qsize() >= self.limit:
            self.dropped += 1
            return

        async def call() -> None:
            await self.inner.event(kind, reason, message)

        self._put(_Item(call))

    def post_condition(
        self, status: str, reason: str, message: str, attempts: int | None = 1
    ) -> None:
        """Set the condition in the background, in order; a failure is the inner's to log."""

        async def call() -> None:
            with contextlib.suppress(Exception):
                await self.inner.set_condition(status, reason, message, attempts=attempts)

        self._put(_Item(call))

    async def set_condition(
        self, status: str, reason: str, message: str, attempts: int | None = 8
    ) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def call() -> None:
            await self.inner.set_condition(status, reason, message, attempts=attempts)

        item = _Item(call, done)
        self._put(item)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            # The caller gave up (the pod is stopping): so does the call, made or not.
            done.cancel()
            if item.running is not None:
                item.running.cancel()
            raise

    async def close(self, within: float) -> bool:
        """Send what is queued for up to `within` seconds, then stop; True if all went out."""
        sender = self._sender
        if sender is None:
            return True
        try:
            async with asyncio.timeout(within):
                await self._queue.join()
            flushed = True
        except TimeoutError:
            flushed = False
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        return flushed


async def best_effort(call: Coroutine[Any, Any, None]) -> None:
    """Await a report that may fail (a False condition): its failure is logged, not raised."""
    try:
        await call
    except Exception as err:
        log.warning("condition.not_set", error=str(err) or type(err).__name__)
