"""The readiness gate that keeps traffic away until the model is in the local cache."""

from __future__ import annotations

from injector.mutation.context import MutationContext


def add_readiness_gate(ctx: MutationContext) -> None:
    condition = ctx.config.readiness.condition_type
    gates = ctx.spec.get("readinessGates") or []
    if any(isinstance(g, dict) and g.get("conditionType") == condition for g in gates):
        return
    ctx.patch.append(("spec", "readinessGates"), {"conditionType": condition})
