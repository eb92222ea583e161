"""The status annotation: what was injected, readable with `kubectl describe pod`."""

from __future__ import annotations

import json
from typing import Any

from injector import __version__
from injector.mutation.context import MutationContext
from injector.mutation.volumes import desired_volumes


def status_document(ctx: MutationContext) -> dict[str, Any]:
    plan, config = ctx.plan, ctx.config
    profile = config.cluster.profile
    affinity: dict[str, str] = {}
    if plan.ssd_policy != "off" and config.ssd_node_label:
        affinity[str(config.ssd_node_label)] = plan.ssd_policy
    if profile.streaming_node_label and profile.streaming_affinity != "off":
        affinity[str(profile.streaming_node_label)] = profile.streaming_affinity
    return {
        "version": __version__,
        "bento": f"{plan.bento_name}:{plan.bento_version}",
        "sidecar": {"name": config.sidecar.container_name, "mode": plan.sidecar_mode},
        "cache": {
            "size": plan.cache_size,
            "medium": config.volumes.cache_medium or "node-local disk (emptyDir)",
        },
        "volumes": [v["name"] for v in desired_volumes(ctx)],
        "juicefs": {"volume": plan.volume, "path": plan.juicefs_path, "models": list(plan.models)},
        "affinity": affinity,
        "profile": config.cluster.platform_profile,
        "readinessGate": config.readiness.condition_type,
        "warmup": {"enabled": plan.warmup, "timeoutSeconds": plan.warmup_timeout_seconds},
    }


def add_status(ctx: MutationContext) -> None:
    # Once injected, the status describes what the pod got then; a later pass
    # (re-invocation, a changed config) must not make it describe something else.
    if ctx.plan.already_injected:
        return
    key = ctx.config.annotations.status
    # Insertion order, not sorted: `kubectl describe` shows only the start
    # of a long annotation, so what matters most comes first.
    value = json.dumps(status_document(ctx), separators=(",", ":"))
    current = ((ctx.pod.get("metadata") or {}).get("annotations") or {}).get(key)
    if current != value:
        ctx.patch.set(("metadata", "annotations", key), value)
