"""Node affinity merged into what the pod already has, never replacing it."""

from __future__ import annotations

from typing import Any, Literal

from injector.mutation.context import MutationContext

NODE_AFFINITY = ("spec", "affinity", "nodeAffinity")
REQUIRED = (*NODE_AFFINITY, "requiredDuringSchedulingIgnoredDuringExecution")
TERMS = (*REQUIRED, "nodeSelectorTerms")
PREFERRED = (*NODE_AFFINITY, "preferredDuringSchedulingIgnoredDuringExecution")


def require(ctx: MutationContext, expression: dict[str, Any]) -> None:
    """AND expression into every existing term (the cross product), or add a term."""
    terms = ctx.patch.get(TERMS) or []
    if not terms:
        ctx.patch.append(TERMS, {"matchExpressions": [expression]})
        return
    key = expression["key"]
    for index, term in enumerate(terms):
        existing = [e for e in term.get("matchExpressions") or [] if e.get("key") == key]
        if existing and expression not in existing:
            # The chart already decided about this label in this term; ANDing
            # ours could make the term unsatisfiable, so leave it and say so.
            ctx.warnings.append(
                f"required node affinity term {index} already constrains {key}; left as written"
            )
        elif not existing:
            ctx.patch.append((*TERMS, index, "matchExpressions"), expression)


def prefer(ctx: MutationContext, expression: dict[str, Any], weight: int) -> None:
    preferred = ctx.patch.get(PREFERRED) or []
    if any(
        expression in ((p.get("preference") or {}).get("matchExpressions") or []) for p in preferred
    ):
        return
    ctx.patch.append(
        PREFERRED, {"weight": weight, "preference": {"matchExpressions": [expression]}}
    )


def apply_policy(
    ctx: MutationContext,
    policy: Literal["required", "preferred", "off"],
    expression: dict[str, Any],
    weight: int,
) -> None:
    if policy == "required":
        require(ctx, expression)
    elif policy == "preferred":
        prefer(ctx, expression, weight)


def add_ssd_affinity(ctx: MutationContext) -> None:
    label = ctx.config.ssd_node_label
    if label is not None:
        weight = ctx.config.scheduling.preferred_weight
        apply_policy(ctx, ctx.plan.ssd_policy, label.expression(), weight)
