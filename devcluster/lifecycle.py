"""`with thing:` for everything devcluster starts: start() on entry, stop() on exit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from types import TracebackType
from typing import Any, Self


class StartStop:
    def start(self) -> object:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def stop_process_group(
    process: subprocess.Popen[Any], timeout: float, *, kill: bool = False
) -> bool:
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
