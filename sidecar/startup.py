"""Whether the app's models are shown yet: what the native sidecar's startup probe asks.

The kubelet starts a pod's app containers only once its native sidecar's
startup probe passes. Where the sidecar serves metrics, that probe is the
kubelet's own httpGet of `common.env.STARTUP_PATH` on the metrics port,
answered here from memory. An exec probe (`python -m sidecar probe`) costs
every run a process in the container, 0.2-0.5 s on two cores, and on a warm
node the models are shown within a second of the sidecar's start, so that
cost was a fifth of a warm pod's start (BENCHMARKS.md, issue 18).

A request waits (up to `wait_seconds`) for the models instead of failing at
once: the app starts the moment they are shown, and a cold node's warm
shows as one failed probe per wait, not one a second.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

SHOWN_TEXT = "models shown\n"
NOT_SHOWN_TEXT = (
    "models not shown yet: the sidecar is still waiting for the node agent's seal "
    "or the JuiceFS mount (see the pod's Events)\n"
)


class ModelsShown:
    """Set once by the sidecar's run when the app's models are shown (the JuiceFS mount
    answers, or the node's verified copy is bound); waited on by the probe's requests,
    each in a thread of the HTTP server's."""

    def __init__(self) -> None:
        self._shown = threading.Event()

    def set(self) -> None:
        self._shown.set()

    def is_set(self) -> bool:
        return self._shown.is_set()

    def wait(self, seconds: float) -> bool:
        """Whether they are shown, waiting up to seconds for it."""
        return self._shown.wait(seconds)


def startup_answer(shown: bool) -> tuple[str, str]:
    """The HTTP status line and body of one probe: 200 once shown, else 503."""
    if shown:
        return "200 OK", SHOWN_TEXT
    return "503 Service Unavailable", NOT_SHOWN_TEXT


def startup_app(shown: ModelsShown, wait_seconds: float) -> WSGIApplication:
    """The WSGI app behind STARTUP_PATH: answers once shown, or after wait_seconds."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        status, text = startup_answer(shown.wait(wait_seconds))
        body = text.encode()
        start_response(
            status,
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return app
