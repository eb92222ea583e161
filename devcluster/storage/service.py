"""What the storage services share: a process with start()/stop(), its errors, binaries.

Each service (MinIO in `devcluster.storage.minio`, Redis in
`devcluster.storage.redis`) listens on `host` (127.0.0.1 by default; a host
address reachable from pods in other network namespaces otherwise) on a free
port, logs to a directory, has start()/stop() and is a context manager; a
failed start raises StorageError ending with the service's log tail.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from common.processes import log_tail, spawn_group, stop_group
from devcluster.binaries import ensure_binaries
from devcluster.lifecycle import StartStop

LOOPBACK = "127.0.0.1"


class StorageError(RuntimeError):
    """A storage service failed; the message ends with its log tail when there is one."""

    def __init__(self, problem: str, log: Path | None = None) -> None:
        message = problem
        if log is not None:
            message += f"\n--- last lines of {log} ---\n{log_tail(log)}"
        super().__init__(message)


def storage_binaries() -> dict[str, Path]:
    """minio, mc and juicefs from the pinned build (hack/build-binaries.sh), built on first use."""
    return ensure_binaries(["minio", "mc", "juicefs"])


class Service(StartStop):
    """A subprocess in its own process group, logging to log_dir/<name>.log."""

    name = "service"

    def __init__(self, log_dir: Path, host: str = LOOPBACK) -> None:
        self.log_dir = Path(log_dir)
        self.log_path = self.log_dir / f"{self.name}.log"
        self.host = host
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.process = spawn_group(args, self.log_path, env=env)

    def _wait_ready(self, probe: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not probe():
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise StorageError(f"{self.name} exited with code {code} on start", self.log_path)
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise StorageError(
                    f"{self.name}: {what} not ready within {timeout:.0f}s", self.log_path
                )
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, *, kill: bool = False, timeout: float = 15.0) -> None:
        """SIGTERM (SIGKILL with kill=True) the process group and wait; idempotent."""
        process, self.process = self.process, None
        if process is not None:
            stop_group(process, timeout, kill=kill)
