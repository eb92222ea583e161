"""One shape for the core/v1 Events the sidecar and the node agent post.

Named as client-go names them (`<object>.<nanoseconds in hex>`), so that list
order, which `kubectl describe` keeps within one second, is creation order.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 1024


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_body(
    *,
    namespace: str,
    involved: dict[str, Any],
    kind: str,
    reason: str,
    message: str,
    component: str,
    instance: str,
    host: str | None,
) -> dict[str, Any]:
    """A core/v1 Event about `involved` (an involvedObject), reported by component."""
    now = now_rfc3339()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{involved['name']}.{time.time_ns():x}", "namespace": namespace},
        "involvedObject": involved,
        "type": kind,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "source": {"component": component, "host": host or None},
        "reportingComponent": f"juicefs.bentoml.com/{component}",
        "reportingInstance": instance,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


# How long a repeated Event counts on the first one (client-go's correlator: 10 min).
SERIES_WINDOW_SECONDS = 600.0
# How many distinct Events a series remembers (the oldest forgotten first).
SERIES_KEYS = 256

SeriesKey = tuple[str, str, str]  # (type, reason, message)


@dataclass
class Repeat:
    """An Event already posted: its name, and what its count becomes with this repeat."""

    name: str
    count: int


class EventSeries:
    """Repeats of one Event become one Event whose count and lastTimestamp grow.

    As client-go's correlator does: the same type, reason and message about
    the same object within `window` seconds of the last is a PATCH of the
    first, not a new object (the node agent retries a missing Bento every
    minute; each retry was a new Event in `default`).
    """

    def __init__(
        self,
        window: float = SERIES_WINDOW_SECONDS,
        keys: int = SERIES_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window = window
        self._keys = keys
        self._clock = clock
        # key -> (Event name, count, when last posted)
        self._seen: OrderedDict[SeriesKey, tuple[str, int, float]] = OrderedDict()

    def repeat(self, key: SeriesKey) -> Repeat | None:
        """The Event to count this one on, or None: post a new one."""
        seen = self._seen.get(key)
        if seen is None or self._clock() - seen[2] > self._window:
            return None
        return Repeat(seen[0], seen[1] + 1)

    def posted(self, key: SeriesKey, name: str, count: int = 1) -> None:
        """Remember that the Event of key is name, now at count."""
        self._seen[key] = (name, count, self._clock())
        self._seen.move_to_end(key)
        while len(self._seen) > self._keys:
            self._seen.popitem(last=False)

    def forget(self, key: SeriesKey) -> None:
        """The Event is gone (its TTL passed): the next one is new."""
        self._seen.pop(key, None)


def repeat_patch(count: int) -> dict[str, Any]:
    """A merge patch counting one more of an Event, now."""
    return {"count": count, "lastTimestamp": now_rfc3339()}


def pod_involved(name: str, namespace: str, uid: str | None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "namespace": namespace, "uid": uid}


def condition_patch(condition_type: str, status: str, reason: str, message: str) -> dict[str, Any]:
    """A strategic merge patch of pods/status: one condition, merged by type.

    The kubelet's own conditions stay as they are.
    """
    return {
        "status": {
            "conditions": [
                {
                    "type": condition_type,
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": now_rfc3339(),
                    "lastProbeTime": None,
                }
            ]
        }
    }
