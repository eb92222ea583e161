"""Whether the sidecar serves its Prometheus metrics in a pod, and on which port."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The sidecar's container port: what the chart's PodMonitor selects.
METRICS_PORT_NAME = "metrics"


def container_declaring(spec: Mapping[str, Any], port: int, sidecar: str) -> str | None:
    """The name of a container of the pod's own that declares port (TCP), if any."""
    for key in ("initContainers", "containers"):
        for container in spec.get(key) or []:
            if not isinstance(container, Mapping) or container.get("name") == sidecar:
                continue
            for declared in container.get("ports") or []:
                if (
                    isinstance(declared, Mapping)
                    and declared.get("containerPort") == port
                    and (declared.get("protocol") or "TCP") == "TCP"
                ):
                    return str(container.get("name"))
    return None


def pod_metrics_port(spec: Mapping[str, Any], port: int, sidecar: str) -> int:
    """The configured port, or 0 (no metrics) where the sidecar must not listen on it.

    With hostNetwork the port would be the node's, and the apiserver defaults
    a declared container port's hostPort to it, so the scheduler would then
    fit one such Bento per node. A container of the pod's own that declares
    the port listens on it in the pod's network namespace: the sidecar,
    started first, would take it from the app.
    """
    if port == 0 or spec.get("hostNetwork") or container_declaring(spec, port, sidecar):
        return 0
    return port
