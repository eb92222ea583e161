"""What the server's parts share to start, stop and report readiness.

Each long-lived part (the serving certificate, the caBundle keeper, the
namespace controller, the API client) is an aiohttp cleanup context: it
starts when the app starts, before the listener opens, and stops in reverse
order when the app is cleaned up, after in-flight requests have finished.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web

# A readiness check: None when ready, else what /readyz should say.
ReadyCheck = Callable[[], Awaitable[str | None]]
CleanupContext = Callable[[web.Application], AsyncIterator[None]]

READY_CHECKS = web.AppKey("ready_checks", list[ReadyCheck])
# Set once the listener serves TLS; cleared when draining on shutdown.
SERVING = web.AppKey("serving", asyncio.Event)
# Set on shutdown: every response then closes its connection, so clients that
# keep connections open (the apiserver does) dial again, to a replica that is
# still in the endpoints, instead of reusing one to us that is about to close.
DRAINING = web.AppKey("draining", asyncio.Event)


@contextlib.asynccontextmanager
async def background(work: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    """Run work as a task for the duration of the block, then cancel it and wait."""
    task = asyncio.create_task(work)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
