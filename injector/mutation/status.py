"""The status annotation: what was injected, readable with `kubectl describe pod`."""

from __future__ import annotations

import json
from typing import Any

from injector import __version__
from injector.mutation.context import MutationContext


def status_document(ctx: MutationContext) -> dict[str, Any]:
    """The plan's choices, and what the steps before this one recorded doing."""
    plan, config, record = ctx.plan, ctx.config, ctx.record
    affinity = {label: outcome.describe() for label, outcome in record.affinity.items()}
    cache: dict[str, Any]
    if plan.cache_mode == "node":
        cache = {
            "mode": "node",
            "medium": "node-local SSD (shared, read-only through the node agent)",
            "budget": config.cache.node_budget,
            "path": plan.node_cache_dir,
        }
    else:
        cache = {
            "mode": "pod",
            "size": plan.cache_size,
            "medium": config.volumes.cache_medium or "node-local disk (emptyDir)",
        }
    return {
        "version": __version__,
        "bento": f"{plan.bento_name}:{plan.bento_version}",
        # Always unprivileged (the node agent mounts for it): not a field.
        "sidecar": {"name": ctx.owned.container, "mode": plan.sidecar_mode},
        "cache": cache,
        "volumes": list(record.volumes),
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
    key = ctx.owned.status_annotation
    # Insertion order, not sorted: `kubectl describe` shows only the start
    # of a long annotation, so what matters most comes first.
    value = json.dumps(status_document(ctx), separators=(",", ":"))
    current = ((ctx.pod.get("metadata") or {}).get("annotations") or {}).get(key)
    if current != value:
        ctx.patch.set(("metadata", "annotations", key), value)
