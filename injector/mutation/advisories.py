"""Warnings about pod shapes that work, but not the way their owner may expect."""

from __future__ import annotations

from injector.mutation.context import MutationContext


def add_advisories(ctx: MutationContext) -> None:
    spec = ctx.spec
    if spec.get("hostNetwork") and spec.get("dnsPolicy") != "ClusterFirstWithHostNet":
        ctx.warnings.append(
            "hostNetwork without dnsPolicy ClusterFirstWithHostNet: juicefs-mount cannot "
            "resolve in-cluster services"
        )
    if ctx.plan.sidecar_mode == "classic" and spec.get("restartPolicy") in ("Never", "OnFailure"):
        ctx.warnings.append(
            "classic juicefs-mount sidecar (cluster < 1.29) outlives the app: this Job's pod "
            "will not complete"
        )
