"""Warnings about pod shapes that work, but not the way their owner may expect."""

from __future__ import annotations

from injector.mutation.context import MutationContext


def add_advisories(ctx: MutationContext) -> None:
    spec = ctx.spec
    if spec.get("hostNetwork") and spec.get("dnsPolicy") != "ClusterFirstWithHostNet":
        ctx.warnings.append(
            "hostNetwork pod without dnsPolicy: ClusterFirstWithHostNet: the juicefs-mount "
            "sidecar resolves names with the node's DNS and cannot reach in-cluster metadata "
            "services by name"
        )
    if ctx.plan.sidecar_mode == "classic" and spec.get("restartPolicy") in ("Never", "OnFailure"):
        ctx.warnings.append(
            "this cluster is configured as older than 1.29, so juicefs-mount is a classic "
            "sidecar that keeps running after the app exits: this Job's pod will not complete "
            "on its own"
        )
