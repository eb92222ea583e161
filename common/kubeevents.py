"""One shape for the core/v1 Events the sidecar and the node agent post.

Named as client-go names them (`<object>.<nanoseconds in hex>`), so that list
order, which `kubectl describe` keeps within one second, is creation order.
"""

from __future__ import annotations

import datetime as dt
import time
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
