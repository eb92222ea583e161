"""Warnings about pod shapes that work, but not the way their owner may expect."""

from __future__ import annotations

from injector.mutation.context import MutationContext
from injector.mutation.metrics_port import container_declaring


def add_advisories(ctx: MutationContext) -> None:
    spec = ctx.spec
    if spec.get("hostNetwork") and spec.get("dnsPolicy") != "ClusterFirstWithHostNet":
        ctx.warnings.append(
            "hostNetwork without dnsPolicy ClusterFirstWithHostNet: juicefs-mount cannot "
            "resolve in-cluster services"
        )
    annotations = (ctx.pod.get("metadata") or {}).get("annotations") or {}
    size_key = ctx.config.annotations.cache_size
    if ctx.plan.cache_mode == "node" and size_key in annotations:
        # Not a denial: charts written for the pod cache keep working when
        # the platform turns the node cache on; they are told why.
        ctx.warnings.append(
            f"annotation {size_key} is ignored: this pod uses the node cache, shared within "
            f"the node budget ({ctx.config.cache.node_budget}, cache.nodeBudget); set "
            f"{ctx.config.annotations.cache_mode}=pod for a cache of its own"
        )
    port = ctx.config.sidecar.metrics_port
    owner = container_declaring(spec, port, ctx.owned.container) if port else None
    if owner is not None:
        # Not a denial: the pod runs as it would without us, only without our metrics.
        ctx.warnings.append(
            f"juicefs-mount serves no Prometheus metrics in this pod (port {port}, "
            f"sidecar.metricsPort): container {owner!r} declares port {port}"
        )
    if ctx.plan.sidecar_mode == "classic" and spec.get("restartPolicy") in ("Never", "OnFailure"):
        ctx.warnings.append(
            "classic juicefs-mount sidecar (cluster < 1.29) outlives the app: this Job's pod "
            "will not complete"
        )
