"""What the sidecar needs to tell the cluster: an interface, so decisions and tests need no API.

`sidecar.kube.PodReporter` is the real one (Events and the pod condition
through the apiserver); tests pass fakes that record what they are told.
"""

from __future__ import annotations

from typing import Protocol

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
