"""What every mutation step sees: the pod, the plan, the config and the patch.

Steps also write down what they did (`Record`), so that the status
annotation reports their outcome instead of deriving it a second time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from injector.config import InjectorConfig
from injector.mutation.metrics_port import pod_metrics_port
from injector.mutation.owned import Owned, owned_names
from injector.patch import PatchBuilder
from injector.plan import InjectionPlan

Container = Mapping[str, Any]


@dataclass(frozen=True)
class AffinityOutcome:
    """What one node label became in the pod's node affinity."""

    policy: Literal["required", "preferred"]
    # Required terms that already constrained the label and were left as
    # written (with a warning): the pod is not held to the label there.
    left_as_written: tuple[int, ...] = ()
    terms: int = 1

    def describe(self) -> str:
        if not self.left_as_written:
            return self.policy
        if len(self.left_as_written) == self.terms:
            return "left as written"
        plural = "s" if len(self.left_as_written) > 1 else ""
        terms = ", ".join(str(index) for index in self.left_as_written)
        return f"required, except term{plural} {terms} (left as written)"


@dataclass
class Record:
    """What the steps did to the pod."""

    # Our volumes the pod has once patched, in the order they were added.
    volumes: list[str] = field(default_factory=list)
    # Node label (as `key=value` or `key`) -> what it became.
    affinity: dict[str, AffinityOutcome] = field(default_factory=dict)


@dataclass
class MutationContext:
    pod: Mapping[str, Any]
    plan: InjectionPlan
    config: InjectorConfig
    patch: PatchBuilder
    warnings: list[str] = field(default_factory=list)
    record: Record = field(default_factory=Record)

    @cached_property
    def owned(self) -> Owned:
        return owned_names(self.config)

    @property
    def spec(self) -> Mapping[str, Any]:
        return self.pod.get("spec") or {}

    @cached_property
    def metrics_port(self) -> int:
        """The port of the sidecar's metrics in this pod; 0: none."""
        return pod_metrics_port(self.spec, self.config.sidecar.metrics_port, self.owned.container)

    def containers(self, key: str) -> list[Container]:
        items = self.spec.get(key) or []
        return [c for c in items if isinstance(c, Mapping)]

    def sidecar_index(self) -> tuple[str, int] | None:
        """Where our sidecar already is (list key, index), if anywhere."""
        name = self.owned.container
        for key in ("initContainers", "containers"):
            for index, container in enumerate(self.containers(key)):
                if container.get("name") == name:
                    return key, index
        return None

    def native_insert_index(self) -> int:
        """Where a new native sidecar goes in initContainers.

        After any service-mesh init container or native proxy, so the mesh is
        up before the mount talks to the metadata engine and object store;
        otherwise first, so every other init container can read the models.
        """
        mesh = {
            *self.config.sidecar.mesh_proxy_containers,
            *self.config.sidecar.mesh_init_containers,
        }
        index = 0
        for position, container in enumerate(self.containers("initContainers")):
            if container.get("name") in mesh:
                index = position + 1
        return index

    def model_consumers(self) -> Iterator[tuple[str, int, Container]]:
        """App containers, and init containers that start after the sidecar."""
        sidecar = self.config.sidecar
        skip = {
            self.owned.container,
            *sidecar.mesh_proxy_containers,
            *sidecar.mesh_init_containers,
        }
        for index, container in enumerate(self.containers("containers")):
            if container.get("name") not in skip:
                yield "containers", index, container
        if self.plan.sidecar_mode != "native":
            return
        found = self.sidecar_index()
        first = (
            found[1] + 1 if found and found[0] == "initContainers" else self.native_insert_index()
        )
        for index, container in enumerate(self.containers("initContainers")):
            if index >= first and container.get("name") not in skip:
                yield "initContainers", index, container
