"""One LIST, then a watch: an in-memory cache of one resource, kept by the API's own events.

The agent's reconcile reads these caches instead of listing: with hundreds of
nodes, a full LIST of every Deployment per agent per resync is what loads
the apiserver, while a watch costs it next to nothing. An Informer lists
once (in pages, so no response holds every object at once), keeps of each
object only what `slim` returns, and then watches from the list's
resourceVersion. A watch the server ends (its timeout) is watched again
from the last resourceVersion seen; bookmarks keep that one fresh while
nothing changes. Only a watch that fails relists: 410 Gone (the
resourceVersion is older than the apiserver's window) at once, any other
error after a pause.

The decisions (what an event does to the cache, whether a relist changed
anything, what follows a watch's end) are pure functions below; the list
and watch requests are injected (nodeagent.kube gives the real ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

log = structlog.get_logger("nodeagent.informer")

V = TypeVar("V")
Obj = Mapping[str, Any]

# Objects per LIST page: the apiserver's own informers use 500.
PAGE_SIZE = 500
RETRY_SECONDS = 5.0
# A watch that ends without an error sooner than this is watched again only this long
# after it started.
MIN_WATCH_SECONDS = 1.0


class WatchError(Exception):
    """The server ended a watch with an error (an ERROR event, or a failed request)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


GONE = 410  # the resourceVersion asked for is older than the apiserver keeps


@dataclass(frozen=True)
class Page:
    """One page of a LIST: its objects (as JSON), its resourceVersion, the next page's token."""

    items: list[dict[str, Any]]
    resource_version: str
    continue_token: str = ""


# A LIST of one page: given the continue token ("" for the first page).
ListPage = Callable[[str], Awaitable[Page]]
# A watch from a resourceVersion: its events as JSON, ending when the server ends it.
WatchFrom = Callable[[str], AsyncGenerator[dict[str, Any], None]]


@dataclass(frozen=True)
class Update(Generic[V]):
    """What one watch event does: store value under uid (None: delete uid; uid "": nothing),
    whether that changes what the agent should do, and the resourceVersion it brings."""

    uid: str
    value: V | None
    changed: bool
    resource_version: str


def uid_of(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


def resource_version_of(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def update(
    items: Mapping[str, V],
    event: Obj,
    slim: Callable[[Obj], V],
    differs: Callable[[V, V], bool],
) -> Update[V]:
    """What a watch event does to the cache (WatchError for an ERROR event or an unknown type).

    An object added or deleted changes things; one modified only when
    differs(old, new) says so (status updates do not, by the caller's rule).
    """
    kind = str(event.get("type") or "")
    obj: Obj = event.get("object") or {}
    if kind == "ERROR":
        raise WatchError(int(obj.get("code") or 0), str(obj.get("message") or obj))
    version = resource_version_of(obj)
    if kind == "BOOKMARK":
        return Update("", None, False, version)
    uid = uid_of(obj)
    if kind == "DELETED":
        return Update(uid, None, uid in items, version)
    if kind in ("ADDED", "MODIFIED"):
        new = slim(obj)
        old = items.get(uid)
        return Update(uid, new, old is None or differs(old, new), version)
    raise WatchError(0, f"unknown watch event type {kind!r}")


def relist_changed(
    before: Mapping[str, V], after: Mapping[str, V], differs: Callable[[V, V], bool]
) -> bool:
    """Whether a relist shows anything the watch missed: an object added, deleted or changed."""
    if before.keys() != after.keys():
        return True
    return any(differs(before[uid], after[uid]) for uid in after)


@dataclass(frozen=True)
class Next:
    """What follows a watch's end: relist first or watch again, and after how long."""

    relist: bool
    delay: float


def after_watch(
    error: BaseException | None, lasted: float = 60.0, retry_seconds: float = RETRY_SECONDS
) -> Next:
    """The server's timeout (no error): watch again from where it left off, at once (after
    a second if the watch lasted less: something between ends them early, and a loop of
    instant re-watches must not hammer the apiserver). 410 Gone: relist at once (the
    resourceVersion has left the apiserver's window). Any other error: relist after a
    pause (what was missed meanwhile is unknown)."""
    if error is None:
        return Next(relist=False, delay=max(MIN_WATCH_SECONDS - lasted, 0.0))
    if isinstance(error, WatchError) and error.code == GONE:
        return Next(relist=True, delay=0.0)
    return Next(relist=True, delay=retry_seconds)


def split_lines(pending: bytes, chunk: bytes) -> tuple[list[bytes], bytes]:
    """A watch body's complete lines (one JSON event each) and the partial line left over.

    Split by hand, not with the stream's readline: that one fails on a line
    longer than its buffer (128 KiB), and one event is one whole object.
    """
    *lines, rest = (pending + chunk).split(b"\n")
    return [line for line in lines if line.strip()], rest


class Informer(Generic[V]):
    """A cache of one resource: list once, then watch; `synced` is set after the first list.

    `changed` is called when an object is added or deleted, or differs(old,
    new) after an update, whether a watch event or a relist shows it (not
    after the first list: the agent's first pass reads that anyway).
    """

    def __init__(
        self,
        resource: str,
        list_page: ListPage,
        watch_from: WatchFrom,
        slim: Callable[[Obj], V],
        differs: Callable[[V, V], bool],
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self.resource = resource
        self._list_page = list_page
        self._watch_from = watch_from
        self._slim = slim
        self._differs = differs
        self._retry_seconds = retry_seconds
        self.items: dict[str, V] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.changed: Callable[[], None] = lambda: None
        # How many LISTs (pages) and watches it made: for the logs and the tests.
        self.lists = 0
        self.watches = 0

    def values(self) -> Iterable[V]:
        return self.items.values()

    async def relist(self) -> None:
        """Every object, page by page, replacing the cache once the last page is in."""
        started = time.monotonic()
        items: dict[str, V] = {}
        token, version, pages = "", "", 0
        while True:
            page = await self._list_page(token)
            self.lists += 1
            pages += 1
            # Every page is read at the first page's resourceVersion.
            version = version or page.resource_version
            for obj in page.items:
                items[uid_of(obj)] = self._slim(obj)
            token = page.continue_token
            # Gone before the next page is fetched: one page's objects in memory at a time
            # (500 Deployments parsed are ~20 MB of small objects, and RSS keeps the peak:
            # in process, +47 MiB after the first sync with two pages alive, +33 with one).
            del page
            if not token:
                break
        missed = self.synced.is_set() and relist_changed(self.items, items, self._differs)
        self.items, self.resource_version = items, version
        log.info(
            "informer.synced",
            resource=self.resource,
            objects=len(items),
            pages=pages,
            seconds=round(time.monotonic() - started, 2),
        )
        self.synced.set()
        if missed:
            self.changed()

    def apply(self, event: Obj) -> None:
        """One watch event into the cache (WatchError for an ERROR event)."""
        step = update(self.items, event, self._slim, self._differs)
        if step.resource_version:
            self.resource_version = step.resource_version
        if step.uid:
            if step.value is None:
                self.items.pop(step.uid, None)
            else:
                self.items[step.uid] = step.value
        if step.changed:
            self.changed()

    async def watch(self) -> None:
        """One watch from the current resourceVersion, until the server ends it."""
        self.watches += 1
        # Closed at once when an event raises, not whenever the collector gets to it:
        # closing ends the request.
        async with contextlib.aclosing(self._watch_from(self.resource_version)) as events:
            async for event in events:
                self.apply(event)

    async def run(self) -> None:
        """List, then watch for ever (until cancelled), relisting only as after_watch says."""
        relist = True
        while True:
            error: Exception | None = None
            started = time.monotonic()
            try:
                if relist:
                    await self.relist()
                await self.watch()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                error = err
            step = after_watch(error, time.monotonic() - started, self._retry_seconds)
            if error is not None:
                log.warning(
                    "informer.watch_failed",
                    resource=self.resource,
                    error=str(error) or type(error).__name__,
                    relist_in=step.delay,
                )
            relist = step.relist
            if step.delay:
                await asyncio.sleep(step.delay)
