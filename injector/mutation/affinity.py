"""Node affinity merged into what the pod already has, never replacing it."""

from __future__ import annotations

from typing import Any, Literal

from injector.config import NodeLabel
from injector.mutation.context import AffinityOutcome, MutationContext

NODE_AFFINITY = ("spec", "affinity", "nodeAffinity")
REQUIRED = (*NODE_AFFINITY, "requiredDuringSchedulingIgnoredDuringExecution")
TERMS = (*REQUIRED, "nodeSelectorTerms")
PREFERRED = (*NODE_AFFINITY, "preferredDuringSchedulingIgnoredDuringExecution")


def require(ctx: MutationContext, expression: dict[str, Any]) -> AffinityOutcome:
    """AND expression into every existing term (the cross product), or add a term."""
    terms = ctx.patch.get(TERMS) or []
    if not terms:
        ctx.patch.append(TERMS, {"matchExpressions": [expression]})
        return AffinityOutcome("required")
    key = expression["key"]
    left: list[int] = []
    for index, term in enumerate(terms):
        existing = [e for e in term.get("matchExpressions") or [] if e.get("key") == key]
        if existing and expression not in existing:
            # The chart already decided about this label in this term; ANDing
            # ours could make the term unsatisfiable, so leave it and say so.
            left.append(index)
            ctx.warnings.append(
                f"required node affinity term {index} already constrains {key}; left as written"
            )
        elif not existing:
            ctx.patch.append((*TERMS, index, "matchExpressions"), expression)
    return AffinityOutcome("required", left_as_written=tuple(left), terms=len(terms))


def prefer(ctx: MutationContext, expression: dict[str, Any], weight: int) -> AffinityOutcome:
    preferred = ctx.patch.get(PREFERRED) or []
    if not any(
        expression in ((p.get("preference") or {}).get("matchExpressions") or []) for p in preferred
    ):
        ctx.patch.append(
            PREFERRED, {"weight": weight, "preference": {"matchExpressions": [expression]}}
        )
    return AffinityOutcome("preferred")


def apply_policy(
    ctx: MutationContext,
    policy: Literal["required", "preferred", "off"],
    label: NodeLabel,
    weight: int,
) -> None:
    """Steer to label as policy says, and record what the pod got."""
    if policy == "required":
        ctx.record.affinity[str(label)] = require(ctx, label.expression())
    elif policy == "preferred":
        ctx.record.affinity[str(label)] = prefer(ctx, label.expression(), weight)


def add_ssd_affinity(ctx: MutationContext) -> None:
    label = ctx.config.ssd_node_label
    if label is not None:
        weight = ctx.config.scheduling.preferred_weight
        apply_policy(ctx, ctx.plan.ssd_policy, label, weight)
