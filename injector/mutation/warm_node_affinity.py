"""Prefer nodes where the pod's Bento is already warm in the node cache.

The node agent labels its Node `warm_label_key(name, version)=<volume>` once
every byte of that Bento's models is in the node cache and verified
(`common.warm`). A pod on the node cache that lands there opens its gate
after reading its model from local disk instead of the object store; a pod
on its own (pod) cache starts empty wherever it lands, so it gets no term.
"""

from __future__ import annotations

from common.warm import warm_label_key
from injector.config import NodeLabel
from injector.mutation.affinity import prefer
from injector.mutation.context import MutationContext


def warm_node_label(ctx: MutationContext) -> NodeLabel:
    """The label a node carries while this pod's Bento is warm there, from this volume."""
    plan = ctx.plan
    return NodeLabel(key=warm_label_key(plan.bento_name, plan.bento_version), value=plan.volume)


def add_warm_node_affinity(ctx: MutationContext) -> None:
    scheduling = ctx.config.scheduling
    if ctx.plan.cache_mode != "node" or not scheduling.prefer_warm_nodes:
        return
    label = warm_node_label(ctx)
    # Recorded like the SSD and streaming labels, so the status annotation shows it.
    ctx.record.affinity[str(label)] = prefer(ctx, label.expression(), scheduling.warm_node_weight)
