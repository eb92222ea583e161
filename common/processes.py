"""Process groups: start one, stop one, read the tail of its log, list its children.

Everything the project starts on a host (control-plane components, MinIO,
Redis, containerd, the kubelet, the injector, juicefs in tests) goes through
`spawn_group` and `stop_group`, so a stop always takes the whole group with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

LOG_TAIL_LINES = 30
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child when the thread that started it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn_group(
    args: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start args in a new session (pgid == pid), stdout+stderr appended to log_path.

    The command line is written to the log first, so a log always says what ran.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"# {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
        log.flush()
        return subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )


def stop_group(process: subprocess.Popen[Any], timeout: float, *, kill: bool = False) -> bool:
    """SIGTERM (or SIGKILL) a process group leader, wait, SIGKILL what is left.

    Returns False when the process had to be killed after ignoring SIGTERM.
    Anything it forked into its group goes too.
    """
    graceful = True
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            graceful = False
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    return graceful


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file, or why it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _stat_fields(pid: int) -> tuple[str, list[str]] | None:
    """(comm, fields after comm) of /proc/PID/stat, or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    """pid exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[1][0] != "Z"


def _all_processes() -> list[tuple[int, str, list[str]]]:
    """(pid, comm, stat fields after comm) of every process still there."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            found.append((int(entry.name), fields[0], fields[1]))
    return found


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, comm) of the direct children of pid."""
    return [(p, comm) for p, comm, rest in _all_processes() if int(rest[1]) == pid]


def processes_named(comm: str) -> list[int]:
    """Pids of every live process whose comm is exactly comm."""
    return [p for p, name, rest in _all_processes() if name == comm and rest[0] != "Z"]


def processes_using(directory: Path) -> list[int]:
    """Live processes whose command line names directory or whose cwd is inside it.

    How a clean-up finds what a crashed run left behind (a server started
    with its data dir there; one that renames itself but chdir'ed there).
    """
    root = str(Path(directory).resolve())
    me = os.getpid()
    found = []
    for pid, _, rest in _all_processes():
        if pid == me or rest[0] == "Z":
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if root in cmdline or cwd == root or cwd.startswith(root + "/"):
            found.append(pid)
    return found
