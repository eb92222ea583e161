"""Where a review is decided, and when to come back: pure, no I/O (the server applies them).

One event loop serves every connection. A review decided on it holds it for
the whole decision, which costs about 10 us per KB of body (198 us for the
example's 3.6 KB pod, 754 us for a 71 KB one): a small one is over before
anyone notices, a large one (hundreds of KB, all of it CPU) would stall
/healthz and every other review behind it. So a body of at least
`server.offloadBodyBytes` is parsed and decided in a worker thread instead.
"""

from __future__ import annotations

import math
from typing import Literal

Where = Literal["inline", "worker"]


def where_to_decide(body_bytes: int, offload_bytes: int) -> Where:
    """ "worker" for a body of at least offload_bytes (0: every review), else "inline".

    Inline is cheaper for a small body (no hand-off, no thread switch) and,
    since nothing is awaited, cannot overlap another review: only worker
    reviews need the in-flight bound.
    """
    return "worker" if body_bytes >= offload_bytes else "inline"


def retry_after_seconds(queue_seconds: float) -> int:
    """The Retry-After of an overloaded answer: the queue's wait, in whole seconds, at least 1.

    Retry-After is whole seconds (client-go reads it with Atoi); by then the
    reviews that filled the queue have had as long again to finish.
    """
    return max(1, math.ceil(queue_seconds))
