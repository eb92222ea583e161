"""The agent mounts for the unprivileged sidecars on its node, and speaks for them.

For each pod on this node whose sidecar is unprivileged (it has the agent
volume), the agent listens on a unix socket in that volume, on the host
(`<kubelet root>/pods/<uid>/volumes/kubernetes.io~empty-dir/<volume>`). The
socket is the pod's: what arrives there is that pod's sidecar, whatever it
says. Through it (`common.agentsocket`) the sidecar asks to:

- `mount`: the agent opens /dev/fuse, mounts that connection on the private
  directory of the agent volume, and sends the descriptor back; the
  sidecar's `juicefs mount META /dev/fd/N` serves it without privilege. In
  node cache mode the agent also binds the node cache's directory of the
  pod's JuiceFS volume read-only onto the pod's cache volume: tenants read
  the node cache, only the agent writes it.
- `expose`: bind the Bento's `models/` read-only onto the pod's mount dir,
  which the app containers see (HostToContainer): the node's verified local
  copy of it where the agent keeps one (cache.localCopy), else the pod's
  FUSE mount's.
- `event`, `condition`: an Event on the pod, its readiness condition. The
  sidecar holds no Kubernetes credential; the app containers cannot reach
  the socket (the volume is the sidecar's alone).
- `unmount`: on the sidecar's way out.

A pod that is gone, or whose containers have all ended, is unmounted by the
agent itself (the kubelet cannot tear down a volume with a mount on it).
Mounts live in the node's mount namespace, not in the agent: an agent
restart leaves them serving, and the new agent listens again for the pods
it finds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from common import env as contract
from common.agentsocket import (
    LineBuffer,
    ProtocolError,
    Request,
    parse_request,
    render_reply,
    send_with_fd,
    short_name,
)
from common.mounts import is_mounted, unmount
from common.warm import BentoRef
from injector.config import InjectorConfig
from modelstore.localcopy import prefetch
from nodeagent import fuse
from nodeagent.servedpods import (
    PodPaths,
    ServedPod,
    containers_ended,
    pod_paths,
    seal_ahead,
    sealed_message,
    served_pod,
)

log = structlog.get_logger("nodeagent.podmounts")

# How long the agent waits on a FUSE lookup served by the pod's own juicefs.
LOOKUP_TIMEOUT = 10.0
# Events a pod's sidecar may post: a burst, then one a second.
EVENT_BURST = 60
EVENT_PER_SECOND = 1.0


class PodApi(Protocol):
    """What the pod mounts need of the API (nodeagent.kube.AgentApi in a cluster)."""

    async def pod_event(self, pod: ServedPod, kind: str, reason: str, message: str) -> None: ...

    async def pod_condition(
        self, pod: ServedPod, status: str, reason: str, message: str
    ) -> None: ...

    async def watch_pods(
        self, seen: Callable[[dict[str, Any]], None], gone: Callable[[str], None]
    ) -> None: ...

    async def pods_on_node(self) -> list[dict[str, Any]]: ...


# How often the served pods are reconciled from a plain list, whatever the
# watch says: e2e runs saw a new pod go unserved for minutes with the watch alone.
RESYNC_SECONDS = 10.0
# How often a broker checks that its socket is still the one at the pod's path.
SOCKET_CHECK_SECONDS = 1.0

# The node agent's seal of a Bento for a pod (NodeAgent.seal): None, or why not.
Sealer = Callable[[BentoRef, tuple[str, ...]], Awaitable[str | None]]


def _retrieve(task: asyncio.Task[str | None]) -> None:
    """A seal ahead nobody awaited (its pod went): its crash is logged, not lost."""
    if not task.cancelled() and task.exception() is not None:
        log.error("pod.seal_ahead_crashed", error=repr(task.exception()))


async def _no_sealer(bento: BentoRef, models: tuple[str, ...]) -> str | None:
    return "this node agent keeps no node cache"


# Where a pod of a Bento that reads some models finds the node's verified
# local copy of models/ (NodeAgent.served_copy; blocking): None, the FUSE mount's.
CopyServer = Callable[[BentoRef, tuple[str, ...]], Path | None]


def _no_copies(bento: BentoRef, models: tuple[str, ...]) -> Path | None:
    return None


@dataclass
class TokenBucket:
    """At most `burst` at once, refilled at `rate` a second."""

    burst: float
    rate: float
    tokens: float = -1.0
    at: float = 0.0

    def take(self, now: float) -> bool:
        if self.tokens < 0:
            self.tokens, self.at = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class PodBroker:
    """One pod's socket, mounts and reports."""

    pod: ServedPod
    paths: PodPaths
    api: PodApi
    # A private mount of the agent's own where binds are made read-only (fuse.prepare_stage).
    stage: Path
    sealer: Sealer = _no_sealer
    copies: CopyServer = _no_copies
    events: TokenBucket = field(default_factory=lambda: TokenBucket(EVENT_BURST, EVENT_PER_SECOND))
    _task: asyncio.Task[None] | None = None
    # The seal started when the pod was seen (servedpods.seal_ahead), and since when.
    _ahead: asyncio.Task[str | None] | None = None
    _ahead_since: float = 0.0
    _prefetched: bool = False

    def start(self, seal_ahead: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._serve())
        self._task.add_done_callback(self._ended)
        if seal_ahead and self.pod.bento is not None:
            log.info("pod.seal_ahead", pod=str(self.pod), bento=str(self.pod.bento))
            self._ahead_since = time.monotonic()
            self._ahead = asyncio.ensure_future(self._seal_ahead(self.pod.bento))
            self._ahead.add_done_callback(_retrieve)

    async def _seal_ahead(self, bento: BentoRef) -> str | None:
        """The seal, and once sealed from the node's copy, its prefetch: on a warm node the
        copy is read into the page cache while the pod's containers start."""
        why = await self.sealer(bento, self.pod.models)
        if why is None:
            local = await asyncio.to_thread(self.copies, bento, self.pod.models)
            if local is not None:
                self._prefetch(local)
        return why

    def _prefetch(self, local: Path) -> None:
        """Read the copy into the page cache ahead of the app, once per pod, in a thread of
        its own (off any request's clock: the sidecar waits for its reply)."""
        if self._prefetched:
            return
        self._prefetched = True
        threading.Thread(target=prefetch, args=(local,), daemon=True).start()

    @property
    def serving(self) -> bool:
        return self._task is not None and not self._task.done()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("pod.broker_crashed", pod=str(self.pod), error=repr(task.exception()))

    async def close(self, release: bool) -> None:
        """Stop listening; with release, take the pod's mounts down too."""
        if self._ahead is not None:  # the pod went before its sidecar asked
            self._ahead.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ahead
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if release:
            await asyncio.to_thread(self.release)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        conversations: set[asyncio.Task[None]] = set()
        try:
            while True:
                listener, bound = await self._listen()
                accepting = loop.create_task(self._accept(listener, conversations))
                try:
                    await _until_lost(self.paths.socket, bound)
                finally:
                    accepting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await accepting
                    listener.close()
                # The kubelet mounted the volume's tmpfs over the socket after the
                # agent bound it (the directory exists a moment before), or it was
                # removed: the sidecar would wait for it in vain. Bind it again.
                log.warning("pod.socket_lost", pod=str(self.pod), socket=str(self.paths.socket))
        finally:
            for task in conversations:
                task.cancel()

    async def _accept(
        self, listener: socket.socket, conversations: set[asyncio.Task[None]]
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            # Several at once: a seal may take a whole warm while Events go on.
            task = loop.create_task(self._converse_and_close(conn))
            conversations.add(task)
            task.add_done_callback(conversations.discard)

    async def _converse_and_close(self, conn: socket.socket) -> None:
        try:
            await self._converse(conn)
        except OSError as err:
            log.info("pod.connection_lost", pod=str(self.pod), error=str(err))
        finally:
            conn.close()

    async def _listen(self) -> tuple[socket.socket, tuple[int, int]]:
        """Bind the pod's socket once the kubelet has made its volume; the listener, and
        the (device, inode) of the socket file it bound (socket_still_bound)."""
        while not await asyncio.to_thread(self.paths.agent_dir.is_dir):  # noqa: ASYNC110
            await asyncio.sleep(0.2)  # the kubelet makes it; no event says when
        path = self.paths.socket
        while True:
            # Whatever the sidecar left at that name (a symlink, a file) goes;
            # unlink never follows a symlink, and bind refuses an existing name.
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                path.unlink()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with short_name(path) as name:
                    listener.bind(name)
                bound = _let_anyone_connect(path)
            except OSError as err:
                listener.close()
                log.warning("pod.socket_bind_failed", pod=str(self.pod), error=str(err))
                await asyncio.sleep(1.0)
                continue
            break
        listener.listen(4)
        listener.setblocking(False)
        log.info("pod.listening", pod=str(self.pod), socket=str(path))
        return listener, bound

    async def _converse(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        lines = LineBuffer()
        while True:
            data = await loop.sock_recv(conn, 4096)
            if not data:
                return
            try:
                received = lines.feed(data)
            except ProtocolError as err:
                await loop.sock_sendall(conn, render_reply(str(err)))
                return
            for line in received:
                await self._answer(conn, line)

    async def _answer(self, conn: socket.socket, line: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            request = parse_request(line)
        except ProtocolError as err:
            await loop.sock_sendall(conn, render_reply(str(err)))
            return
        if request.op == "mount":
            try:
                fd = await asyncio.to_thread(self.mount)
            except OSError as err:
                log.error("pod.mount_failed", pod=str(self.pod), error=str(err))
                await loop.sock_sendall(
                    conn, render_reply(f"the node agent could not mount: {err}")
                )
                return
            try:
                await _send_fd(conn, render_reply(), fd)
            finally:
                os.close(fd)
            return
        if request.op == "seal":
            why, served_copy = await self._seal()
            await loop.sock_sendall(conn, render_reply(why, served_copy))
            return
        error = await self._act(request)
        await loop.sock_sendall(conn, render_reply(error))

    async def _act(self, request: Request) -> str | None:
        try:
            if request.op == "expose":
                async with asyncio.timeout(LOOKUP_TIMEOUT):
                    await asyncio.to_thread(self.expose)
            elif request.op == "unmount":
                await asyncio.to_thread(self.release)
            elif request.op == "event":
                if self.events.take(time.monotonic()):
                    await self.api.pod_event(
                        self.pod, request.kind, request.reason, request.message
                    )
            elif request.op == "condition":
                # The sidecar's word moves only its own pod's gate (the socket is
                # that pod's, and no app container can reach it).
                await self.api.pod_condition(
                    self.pod, request.kind, request.reason, request.message
                )
        except TimeoutError:
            return f"{request.op}: the pod's JuiceFS mount did not answer in {LOOKUP_TIMEOUT:.0f}s"
        except OSError as err:
            log.error("pod.request_failed", pod=str(self.pod), op=request.op, error=str(err))
            return f"{request.op}: {err}"
        except Exception as err:  # an API error: the sidecar retries what matters
            log.warning("pod.request_failed", pod=str(self.pod), op=request.op, error=str(err))
            return f"{request.op}: {type(err).__name__}: {err}"[:512]
        return None

    async def _seal(self) -> tuple[str | None, bool]:
        """Open the pod's gate from the node's seal of its Bento (warmed first if cold): why
        not (None: sealed), and whether the node's verified local copy serves its models."""
        bento = self.pod.bento
        if bento is None:
            return "seal is for node cache mode: this pod verifies its own cache", False
        ahead = self._ahead
        started = self._ahead_since if ahead is not None else time.monotonic()
        try:
            if ahead is not None:
                # Shielded: a sidecar that hangs up and asks again finds it still running.
                why = await asyncio.shield(ahead)
                self._ahead = None  # used: a restarted sidecar's request seals afresh
            else:
                why = await self.sealer(bento, self.pod.models)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the gate stays closed, and says why
            self._ahead = None
            log.error("pod.seal_crashed", pod=str(self.pod), error=str(err))
            why = f"the node agent failed sealing {bento}: {type(err).__name__}: {err}"
        try:
            if why is not None:
                await self.api.pod_condition(self.pod, "False", "SealFailed", why[:256])
                return why, False
            seconds = time.monotonic() - started
            local = await asyncio.to_thread(self.copies, bento, self.pod.models)
            message = sealed_message(str(bento), seconds, local is not None)
            await self.api.pod_condition(self.pod, "True", "ModelsSealed", message)
        except Exception as err:  # an API error: the sidecar asks again
            log.warning("pod.request_failed", pod=str(self.pod), op="seal", error=str(err))
            return f"seal: {type(err).__name__}: {err}"[:512], False
        log.info("pod.sealed", pod=str(self.pod), bento=str(bento), seconds=round(seconds, 2))
        return None, local is not None

    # The privileged acts, blocking: run in a thread.

    def mount(self) -> int:
        """A FUSE connection mounted on the private dir (fresh each time); its descriptor."""
        paths = self.paths
        # A remount (juicefs died): the dead mounts go first, lazily.
        self._unmount(paths.private_mount)
        fuse_fd = fuse.open_fuse_device()
        try:
            with (
                fuse.opened_path(paths.agent_dir) as agent_dir,
                fuse.opened_dir(agent_dir, contract.AGENT_MOUNT_NAME, create=True) as target,
            ):
                fuse.mount_fuse(target, fuse_fd, f"bento-juicefs:{self.pod.uid}")
            if self.pod.node_cache is not None and not is_mounted(paths.cache_path):
                self.pod.node_cache.mkdir(parents=True, exist_ok=True)
                with fuse.opened_path(self.pod.node_cache) as source:
                    fuse.bind_read_only(source, paths.cache_path, self.stage, noexec=True)
        except BaseException:
            os.close(fuse_fd)
            raise
        log.info("pod.mounted", pod=str(self.pod), node_cache=str(self.pod.node_cache or ""))
        return fuse_fd

    def expose(self) -> None:
        """Bind the Bento's models/ read-only onto the mount dir: the node's verified local
        copy when it holds them all (NodeAgent.served_copy), else the pod's FUSE mount's.

        The FUSE mount is served by the pod's own juicefs, so what it calls
        models/ is checked: a real directory of that mount, no symlink. The
        copy is the agent's own, of the pod's own Bento and volume, bound
        read-only and noexec as the node cache is.
        """
        paths = self.paths
        bento = self.pod.bento
        local = None if bento is None else self.copies(bento, self.pod.models)
        if local is not None:
            with fuse.opened_path(local) as models:
                fuse.bind_read_only(models, paths.mount_dir_path, self.stage, noexec=True)
            log.info("pod.exposed", pod=str(self.pod), source="local-copy", path=str(local))
            self._prefetch(local)
            return
        with (
            fuse.opened_path(paths.private_mount) as root,
            fuse.opened_dir(root, "models") as models,
        ):
            if not fuse.is_fuse_dir(models) or os.fstat(models).st_dev != os.fstat(root).st_dev:
                raise fuse.MountFailed(0, "models/ is not a directory of the pod's JuiceFS mount")
            # A remount (juicefs died): the new bind goes on top of the dead
            # one and propagates to the app containers over it. Unmounting
            # the dead one first would leave the app an empty dir meanwhile,
            # and may block on a hung FUSE daemon; release() pops the stack.
            fuse.bind_read_only(models, paths.mount_dir_path, self.stage)
        log.info("pod.exposed", pod=str(self.pod), source="juicefs")

    def release(self) -> None:
        """Every mount the agent made for the pod goes (lazily where busy)."""
        paths = self.paths
        for path in (paths.mount_dir_path, paths.private_mount, paths.cache_path):
            self._unmount(path)
        log.info("pod.unmounted", pod=str(self.pod))

    def _unmount(self, path: Path) -> None:
        try:
            unmount(path)
        except OSError as err:
            log.warning("pod.unmount_failed", pod=str(self.pod), path=str(path), error=str(err))
        except RuntimeError as err:
            log.warning("pod.unmount_failed", pod=str(self.pod), path=str(path), error=str(err))


def _let_anyone_connect(path: Path) -> tuple[int, int]:
    """0666 on the socket just bound at path (the sidecar's uid connects), never on what a
    symlink there points to: it is opened O_PATH without following one, checked to be a
    socket, and changed through that descriptor. Returns the socket file's (device, inode)."""
    fd = os.open(path, fuse.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        found = os.fstat(fd)
        if not stat.S_ISSOCK(found.st_mode):
            raise fuse.MountFailed(0, f"{path} is not the agent's socket any more")
        os.chmod(fuse.fd_path(fd), 0o666)
        return found.st_dev, found.st_ino
    finally:
        os.close(fd)


async def _until_lost(path: Path, bound: tuple[int, int]) -> None:
    """Return once path no longer names the socket bound (checked every few seconds; a
    stat of the pod's agent volume, a tmpfs, never waits on a FUSE daemon)."""
    while await asyncio.to_thread(socket_still_bound, path, bound):  # noqa: ASYNC110
        await asyncio.sleep(SOCKET_CHECK_SECONDS)


def socket_still_bound(path: Path, bound: tuple[int, int]) -> bool:
    """Whether path still names the socket file `bound` (device, inode; never following a
    symlink): not when the kubelet mounted the pod's tmpfs over it, nor when it was
    removed or replaced."""
    try:
        found = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISSOCK(found.st_mode) and (found.st_dev, found.st_ino) == bound


async def _send_fd(conn: socket.socket, data: bytes, fd: int) -> None:
    # A reply is a few bytes on a fresh unix socket: the buffer has room,
    # but a non-blocking socket may still say so; then wait a moment.
    for _ in range(100):
        try:
            send_with_fd(conn, data, fd)
            return
        except BlockingIOError:
            await asyncio.sleep(0.01)
    raise OSError("the sidecar's socket stayed full")


@dataclass
class PodMounts:
    """Every served pod on this node: a broker each, started and closed as the API says."""

    config: InjectorConfig
    kubelet_root: Path
    api: PodApi
    stage: Path
    sealer: Sealer = _no_sealer
    copies: CopyServer = _no_copies
    brokers: dict[str, PodBroker] = field(default_factory=dict)
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    async def run_forever(self) -> None:
        await asyncio.to_thread(fuse.prepare_stage, self.stage)
        try:
            await asyncio.gather(self.api.watch_pods(self.seen, self.gone), self._resync())
        finally:
            for broker in list(self.brokers.values()):
                await broker.close(release=False)  # mounts stay: they serve the pods

    async def _resync(self) -> None:
        """Every RESYNC_SECONDS: serve every pod listed, let go of every one not."""
        while True:
            await asyncio.sleep(RESYNC_SECONDS)
            try:
                listed = await self.api.pods_on_node()
            except Exception as err:  # the watch goes on; the next resync tries again
                log.warning("pods.resync_failed", error=str(err) or type(err).__name__)
                continue
            uids = {str((p.get("metadata") or {}).get("uid") or "") for p in listed}
            for uid in set(self.brokers) - uids:
                self.gone(uid)
            for pod in listed:
                self.seen(pod)

    def seen(self, pod: dict[str, Any]) -> None:
        """A pod on this node was listed, added or changed."""
        uid = str((pod.get("metadata") or {}).get("uid") or "")
        log.debug("pod.seen", uid=uid, served=uid in self.brokers)
        if containers_ended(pod):
            self.gone(uid)
            return
        if uid in self.brokers and self.brokers[uid].serving:
            return
        served = served_pod(pod, self.config)
        if isinstance(served, str):
            log.debug("pod.not_served", uid=uid, why=served)
            return
        paths = pod_paths(self.kubelet_root, served.uid, self.config)
        broker = PodBroker(served, paths, self.api, self.stage, self.sealer, self.copies)
        self.brokers[uid] = broker
        broker.start(seal_ahead(pod, served))
        log.info("pod.served", pod=str(served), uid=uid)

    def bentos(self) -> set[BentoRef]:
        """The Bentos the served pods read from the node cache."""
        return {b.pod.bento for b in self.brokers.values() if b.pod.bento is not None}

    def gone(self, uid: str) -> None:
        """A pod was deleted, or ended: stop listening and unmount."""
        broker = self.brokers.pop(uid, None)
        if broker is None:
            return
        self._spawn(broker.close(release=True))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
