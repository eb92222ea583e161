"""The mutation pipeline: small pure steps, each adding its part of one JSON patch.

Order matters only where indexes do: model mounts are added to containers at
their original indexes before the sidecar is inserted ahead of them.
Every step first checks whether its part is already there, which is what
makes the patch idempotent and re-invocation safe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from injector.config import InjectorConfig
from injector.mutation.advisories import add_advisories
from injector.mutation.affinity import add_ssd_affinity
from injector.mutation.conflicts import find_conflicts
from injector.mutation.context import MutationContext
from injector.mutation.gate import add_readiness_gate
from injector.mutation.image_streaming import add_image_streaming
from injector.mutation.mounts import add_model_mounts
from injector.mutation.pull_secrets import add_image_pull_secrets
from injector.mutation.sidecar import add_sidecar
from injector.mutation.status import add_status
from injector.mutation.volumes import add_volumes
from injector.mutation.warm_node_affinity import add_warm_node_affinity
from injector.patch import PatchBuilder, PatchOp
from injector.plan import InjectionPlan

Step = Callable[[MutationContext], None]

PIPELINE: tuple[Step, ...] = (
    add_model_mounts,
    add_sidecar,
    add_image_pull_secrets,
    add_volumes,
    add_ssd_affinity,
    add_image_streaming,
    add_warm_node_affinity,
    add_readiness_gate,
    add_advisories,
    add_status,
)


@dataclass(frozen=True)
class Mutation:
    ops: list[PatchOp]
    warnings: list[str]
    conflicts: list[str]


def mutate(pod: Mapping[str, Any], plan: InjectionPlan, config: InjectorConfig) -> Mutation:
    ctx = MutationContext(pod=pod, plan=plan, config=config, patch=PatchBuilder(pod))
    conflicts = find_conflicts(ctx)
    if conflicts:
        return Mutation(ops=[], warnings=[], conflicts=conflicts)
    for step in PIPELINE:
        step(ctx)
    return Mutation(ops=ctx.patch.ops, warnings=ctx.warnings, conflicts=[])
