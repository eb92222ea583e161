"""Commands from Debian packages: find them, or apt-get install what is missing.

    paths = ensure_packages({"buildah": "buildah", "iptables": "iptables"})

Each command is looked up on PATH and in the sbin directories (which a root
shell may not have on PATH). Missing ones are installed in one
`apt-get install -y --no-install-recommends` after one `apt-get update` per
process; both wait for the dpkg lock, so concurrent callers do not fail on it.
Progress goes to stderr, one line per step with seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

SBIN_DIRS: tuple[str, ...] = ("/usr/local/sbin", "/usr/sbin", "/sbin")
APT_LOCK_TIMEOUT_S = 600
_OUTPUT_TAIL_LINES = 20

_lock = threading.Lock()
_apt_updated = False


class PackagesError(RuntimeError):
    """A command is missing and its package could not be installed."""


def _say(message: str) -> None:
    print(f"packages: {message}", file=sys.stderr, flush=True)


def find_command(name: str) -> Path | None:
    """Absolute path of an executable `name` on PATH or in the sbin dirs, else None."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])
    found = shutil.which(name, path=search)
    return None if found is None else Path(found).absolute()


def _apt(args: Sequence[str], what: str) -> None:
    """Run one apt-get command non-interactively; raise PackagesError with its output tail."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = [
        "apt-get",
        "-o",
        f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}",
        "-o",
        "Dpkg::Use-Pty=0",
        *args,
    ]
    started = time.monotonic()
    proc = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        check=False,
    )
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-_OUTPUT_TAIL_LINES:])
        raise PackagesError(
            f"{what} failed (exit {proc.returncode}, {seconds:.1f} s): {' '.join(command)}\n{tail}"
        )
    _say(f"apt-get {' '.join(args)} ({seconds:.1f} s)")


def ensure_packages(commands: Mapping[str, str]) -> dict[str, Path]:
    """Absolute path of each command (name -> Debian package that ships it).

    Commands already present cost nothing. Otherwise, as root, `apt-get update`
    (once per process) and one `apt-get install -y --no-install-recommends` of
    the packages of the missing commands. Raises PackagesError naming the
    packages when not root, when apt fails, or when a package did not provide
    its command.
    """
    global _apt_updated
    with _lock:
        found: dict[str, Path] = {}
        missing: dict[str, str] = {}
        for command, package in commands.items():
            path = find_command(command)
            if path is None:
                missing[command] = package
            else:
                found[command] = path
        if not missing:
            return found

        packages = sorted(set(missing.values()))
        wanted = ", ".join(f"{c} (package {p})" for c, p in sorted(missing.items()))
        if os.geteuid() != 0:
            raise PackagesError(
                f"missing {wanted}; run as root to install them, or: "
                f"apt-get install --no-install-recommends {' '.join(packages)}"
            )
        if find_command("apt-get") is None:
            raise PackagesError(f"missing {wanted}, and apt-get is not available to install them")
        _say(f"missing {wanted}: installing {' '.join(packages)}")
        if not _apt_updated:
            _apt(["update", "-q"], "apt-get update")
            _apt_updated = True
        _apt(
            ["install", "-y", "-q", "--no-install-recommends", *packages],
            f"installing Debian package(s) {', '.join(packages)}",
        )
        for command, package in missing.items():
            path = find_command(command)
            if path is None:
                raise PackagesError(
                    f"Debian package {package} was installed but command {command!r} "
                    "is still not found on PATH or in " + ", ".join(SBIN_DIRS)
                )
            found[command] = path
        return {command: found[command] for command in commands}
