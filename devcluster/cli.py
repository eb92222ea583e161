"""`python -m devcluster up|down|status [--state-dir DIR]`.

`up` runs the control plane detached: it spawns `python -m devcluster _serve`
in a new session, streams that process's log until the state dir says ready
(or the child dies: exit 1 with the log), and prints the admin kubeconfig path
as its last line. `_serve` starts the `ControlPlane` plus the `addons` hooks,
then sleeps until SIGTERM and stops everything. `down` sends it SIGTERM, waits,
kills anything of ours that is left and verifies no process or port remains.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from common.mounts import mounts, unmount
from common.ports import port_is_free
from common.processes import alive, log_tail, processes_using, spawn_group
from devcluster.binaries import (
    CONTROL_PLANE_COMPONENTS,
    NODE_COMPONENTS,
    REPO_ROOT,
    BinariesError,
    ensure_binaries,
)
from devcluster.control.plane import STATE_FILE, ComponentError
from devcluster.local import local_cluster
from devcluster.node.host import node_leftovers, teardown_node
from devcluster.node.netns import NodeNetwork

SERVE_PID = "serve.pid"
SERVE_LOG = "serve.log"
READY_FILE = "ready.json"
UP_TIMEOUT = 300.0
DOWN_TIMEOUT = 60.0


def default_state_dir() -> Path:
    cache = os.environ.get("BENTO_JUICEFS_CACHE") or str(Path.home() / ".cache" / "bento-juicefs")
    return Path(cache) / "cluster"


def _say(message: str) -> None:
    print(f"devcluster: {message}", file=sys.stderr, flush=True)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _serve_pid(state_dir: Path) -> int | None:
    """The pid of this state dir's running `_serve` process, if any."""
    try:
        pid = int((state_dir / SERVE_PID).read_text().strip())
    except (OSError, ValueError):
        return None
    cmd = _cmdline(pid)
    if alive(pid) and "_serve" in cmd and str(state_dir) in cmd:
        return pid
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- _serve -------------------------------------------------------------------


def serve(state_dir: Path, nodes: int = 1) -> int:
    """Run the local cluster in the foreground until SIGTERM/SIGINT; the exit code."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / READY_FILE).unlink(missing_ok=True)
    (state_dir / SERVE_PID).write_text(f"{os.getpid()}\n")
    stopping = threading.Event()
    ready = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        first = not stopping.is_set()
        stopping.set()
        if first and not ready:
            raise SystemExit(128 + signum)  # abort start-up; start() cleans up

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    cp = local_cluster(state_dir, node_count=nodes)
    code = 0
    try:
        cp.start()
        ready = True
        ready_info = {
            "kubeconfig": str(cp.kubeconfig),
            "server": cp.server,
            "startup_seconds": cp.startup_seconds,
            "pid": os.getpid(),
        }
        tmp = state_dir / f".{READY_FILE}.tmp"
        tmp.write_text(json.dumps(ready_info) + "\n")
        tmp.replace(state_dir / READY_FILE)
        while not stopping.wait(1.0):
            dead = [(name, cp.log_path(name)) for name, up in cp.running().items() if not up]
            for node in cp.nodes:
                dead += [
                    (f"{name} of node {node.name}", node.log_path(name))
                    for name, up in node.running.items()
                    if not up
                ]
            if dead:
                cp.log(f"{', '.join(name for name, _ in dead)} exited unexpectedly; shutting down")
                for _, path in dead:
                    cp.log(f"--- {path} ---\n{log_tail(path)}")
                code = 1
                break
        if code == 0:
            cp.log("stop requested")
    finally:
        cp.stop()
        (state_dir / READY_FILE).unlink(missing_ok=True)
        (state_dir / SERVE_PID).unlink(missing_ok=True)
        cp.log("stopped")
    return code


# -- up -------------------------------------------------------------------------


def up(state_dir: Path, nodes: int = 1, timeout: float = UP_TIMEOUT) -> int:
    pid = _serve_pid(state_dir)
    ready = _read_json(state_dir / READY_FILE)
    if pid is not None and ready:
        _say(f"already running (pid {pid}) at {ready.get('server')}")
        print(ready["kubeconfig"], flush=True)
        return 0
    if pid is not None:
        _say(f"a previous start (pid {pid}) is still running; stopping it first")
        down(state_dir)

    _say("checking binaries (hack/build-binaries.sh; the first build takes ~15 min)")
    try:
        ensure_binaries([*CONTROL_PLANE_COMPONENTS, *NODE_COMPONENTS, "minio", "juicefs"])
    except BinariesError as exc:
        _say(str(exc))
        return 1
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / READY_FILE).unlink(missing_ok=True)
    log_path = state_dir / SERVE_LOG
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    log_path.unlink(missing_ok=True)
    # Its own session: it survives this command and its terminal.
    serve_args = ["_serve", "--state-dir", str(state_dir), "--nodes", str(nodes)]
    child = spawn_group(
        [sys.executable, "-m", "devcluster", *serve_args],
        log_path,
        env=env,
        cwd=state_dir,
    )
    _say(f"started control plane supervisor (pid {child.pid}); log {log_path}")

    deadline = time.monotonic() + timeout
    offset = 0
    with log_path.open("rb") as log:
        while True:
            log.seek(offset)
            chunk = log.read()
            offset += len(chunk)
            if chunk:
                sys.stderr.write(chunk.decode(errors="replace"))
                sys.stderr.flush()
            ready = _read_json(state_dir / READY_FILE)
            if ready:
                break
            code = child.poll()
            if code is not None:
                sys.stderr.write(log.read().decode(errors="replace"))
                _say(f"control plane failed to start (supervisor exit code {code}); see {log_path}")
                return 1
            if time.monotonic() > deadline:
                _say(f"not ready within {timeout:.0f}s; stopping")
                down(state_dir)
                return 1
            time.sleep(0.2)
    child.returncode = 0  # detached on purpose: no "still running" warning at exit
    _say(f"ready in {ready.get('startup_seconds')}s at {ready.get('server')}")
    _say(f"export KUBECONFIG={ready['kubeconfig']}; stop with: python -m devcluster down")
    print(ready["kubeconfig"], flush=True)
    return 0


# -- down -----------------------------------------------------------------------


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _stop_supervisor(pid: int, timeout: float) -> None:
    _say(f"stopping control plane supervisor (pid {pid})")
    os.kill(pid, signal.SIGTERM)
    if not _wait_gone([pid], timeout):
        _say(f"supervisor did not exit within {timeout:.0f}s; SIGKILL")
        _kill_group(pid, signal.SIGKILL)
        _wait_gone([pid], 5)


def _stop_leftovers(state: dict[str, Any]) -> list[int]:
    """Components left behind by a supervisor that died without cleaning up; their pids."""
    binaries = set(state.get("binaries", {}).values())
    leftovers = []
    for name, cpid in state.get("pids", {}).items():
        cmd = _cmdline(cpid)
        if alive(cpid) and cmd and cmd[0] in binaries:
            leftovers.append(cpid)
            _say(f"stopping leftover {name} (pid {cpid})")
            _kill_group(cpid, signal.SIGTERM)
    if leftovers and not _wait_gone(leftovers, 15):
        for cpid in leftovers:
            _kill_group(cpid, signal.SIGKILL)
        _wait_gone(leftovers, 5)
    return leftovers


def _stop_node(node: dict[str, Any]) -> list[str]:
    """Tear down a node its supervisor did not stop; what it left behind."""
    network = NodeNetwork(**node["network"])
    teardown_node(Path(node["dir"]), network)
    network.delete()
    return node_leftovers(Path(node["dir"]), network)


def _stop_addons(state_dir: Path) -> list[int]:
    """Add-ons (storage, the injector) and their mounts, found by the state dir they use."""
    strays = processes_using(state_dir)
    for spid in strays:
        _say(f"stopping leftover add-on process {spid}: {' '.join(_cmdline(spid))[:120]}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(spid, signal.SIGKILL)
    _wait_gone(strays, 10)
    for mount in sorted(mounts(), key=lambda m: -len(m.point.parts)):
        if mount.point.is_relative_to(state_dir):
            _say(f"unmounting leftover {mount.point}")
            unmount(mount.point)
    return strays


def down(state_dir: Path, timeout: float = DOWN_TIMEOUT) -> int:
    state = _read_json(state_dir / STATE_FILE) or {}
    pid = _serve_pid(state_dir)
    if pid is not None:
        _stop_supervisor(pid, timeout)
    leftovers = _stop_leftovers(state)
    nodes = state.get("nodes") or ([state["node"]] if state.get("node") else [])
    for node in reversed(nodes):  # a supervisor that died without stopping its nodes
        left = _stop_node(node)
        if left:
            _say(f"not clean: node {node.get('name')} left {', '.join(left)}")
            return 1
    strays = _stop_addons(state_dir)

    still = [p for p in [*([pid] if pid else []), *leftovers, *strays] if alive(p)]
    busy = [p for p in state.get("ports", {}).values() if p and not port_is_free(p)]
    for name in (READY_FILE, SERVE_PID, STATE_FILE):
        (state_dir / name).unlink(missing_ok=True)
    if still or busy:
        _say(f"not clean: processes {still} still alive, ports {busy} still in use")
        return 1
    _say("stopped" if pid is not None or leftovers else "nothing running")
    return 0


MAX_NODES = 8


def node_count(text: str) -> int:
    """--nodes: a whole number from 1 to MAX_NODES (each node is a containerd and a kubelet)."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_NODES:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number from 1 to {MAX_NODES}")
    return count


def status(state_dir: Path) -> int:
    pid = _serve_pid(state_dir)
    ready = _read_json(state_dir / READY_FILE)
    if pid is None:
        _say("not running")
        return 3
    if not ready:
        _say(f"starting (pid {pid})")
        return 3
    _say(f"running (pid {pid}) at {ready.get('server')}")
    print(ready["kubeconfig"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devcluster",
        description="A local Kubernetes control plane (etcd, kube-apiserver, "
        "kube-controller-manager, kube-scheduler) from upstream binaries.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{up,down,status}")
    for name, text in (
        ("up", "start detached; prints the admin kubeconfig path last"),
        ("down", "stop everything started by `up` (idempotent)"),
        ("status", "print the kubeconfig path if running (exit 3 if not)"),
        ("_serve", None),
    ):
        cmd = sub.add_parser(name, help=text) if text else sub.add_parser(name)
        cmd.add_argument(
            "--state-dir",
            type=Path,
            default=default_state_dir(),
            help="where PKI, kubeconfigs, etcd data and logs go (default: %(default)s)",
        )
        if name in ("up", "_serve"):
            cmd.add_argument(
                "--nodes",
                type=node_count,
                default=1,
                help="how many real nodes of one GPU pool (default: %(default)s)",
            )
    args = parser.parse_args(argv)
    state_dir: Path = args.state_dir.expanduser().resolve()
    if args.command == "up":
        return up(state_dir, nodes=args.nodes)
    if args.command == "down":
        return down(state_dir)
    if args.command == "status":
        return status(state_dir)
    try:
        return serve(state_dir, nodes=args.nodes)
    except (ComponentError, BinariesError) as exc:
        print(f"devcluster: {exc}", file=sys.stderr, flush=True)
        return 1
