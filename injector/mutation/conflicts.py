"""Refuse pods that cannot be injected safely, saying why and what to do.

Four kinds: names or mounts of the pod's own that collide with ours; a pod
claiming (by our status annotation) to be injected whose "ours" parts are not
what we create (every volume of ours is an emptyDir, never a host path); a
container of the pod's that mounts our cache or the sidecar's agent volume;
and shapes that would never start (a classic mesh proxy capturing the
sidecar's traffic, a native sidecar stripped of its restart policy by
another webhook).
"""

from __future__ import annotations

from typing import Any

from injector.mutation.context import MutationContext
from injector.mutation.sidecar import sidecar_container


def _name_clashes(ctx: MutationContext) -> list[str]:
    owned = ctx.owned
    hint = f"rename it or opt the pod out with label {ctx.config.labels.inject}=false"
    problems = []
    name = owned.container
    for key in ("initContainers", "containers", "ephemeralContainers"):
        if any(c.get("name") == name for c in ctx.containers(key)):
            problems.append(f"spec.{key} already has a container named {name!r}; {hint}")
    for volume in ctx.spec.get("volumes") or []:
        if isinstance(volume, dict) and volume.get("name") in owned.volumes:
            problems.append(f"spec.volumes already has a volume named {volume['name']!r}; {hint}")
    return problems


def _forged_parts(ctx: MutationContext) -> list[str]:
    """The status annotation is ours alone: what it vouches for must look like ours."""
    owned = ctx.owned
    status = owned.status_annotation
    problems = []
    for volume in ctx.spec.get("volumes") or []:
        if not isinstance(volume, dict) or volume.get("name") not in owned.volumes:
            continue
        source = [k for k, v in volume.items() if k != "name" and v is not None]
        if source != ["emptyDir"]:
            kind = "/".join(source) or "empty"
            problems.append(
                f"pod carries {status} but volume {volume['name']!r} is {kind}, not what the "
                "injector creates; that annotation cannot be set by hand"
            )
    found = ctx.sidecar_index()
    if found is not None:
        key, index = found
        sidecar: dict[str, Any] = dict(ctx.containers(key)[index])
        differs = _differences(sidecar, sidecar_container(ctx))
        if differs:
            problems.append(
                f"pod carries {status} but container {owned.container!r} is not "
                f"the one the injector creates ({', '.join(differs)} differ)"
            )
        if (
            ctx.plan.sidecar_mode == "native"
            and key == "initContainers"
            and sidecar.get("restartPolicy") != "Always"
        ):
            problems.append(
                f"init container {owned.container!r} lost restartPolicy: Always, so "
                "it would block the pod forever: a mutating webhook that ran after the injector "
                "rewrote it"
            )
    return problems


def _sidecar_only_mounts(ctx: MutationContext) -> list[str]:
    """No container but ours mounts the cache or the agent volume.

    In node mode the cache is every pod's on the node; the agent volume's
    socket speaks for the pod to the privileged node agent.
    """
    owned = ctx.owned
    private = owned.sidecar_only_volumes
    problems = []
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for container in ctx.containers(key):
            if container.get("name") == owned.container:
                continue
            for mount in container.get("volumeMounts") or []:
                if not isinstance(mount, dict) or mount.get("name") not in private:
                    continue
                if mount.get("name") == owned.agent_volume:
                    message = (
                        f"container {container.get('name')!r} in spec.{key} mounts volume "
                        f"{mount.get('name')!r}, the node agent's socket for the sidecar, "
                        f"which only {owned.container} may mount; remove that mount"
                    )
                else:
                    message = (
                        f"container {container.get('name')!r} in spec.{key} mounts volume "
                        f"{mount.get('name')!r}, the JuiceFS cache, which only "
                        f"{owned.container} may mount; remove that mount"
                    )
                problems.append(message)
    return problems


# Fields the apiserver adds by defaulting; anything else extra is not ours.
_DEFAULTED = frozenset({"terminationMessagePath"})
# Fields another webhook may rewrite: a mesh injector sends HTTP probes through
# its own agent (Istio's rewriteAppHTTPProbe). A startup probe grants nothing:
# the kubelet runs it against this pod alone, and an exec probe runs as the
# sidecar, like an exec any tenant may already do into it.
_REWRITABLE = frozenset({"startupProbe"})


def _differences(actual: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Top-level fields of actual that are not what the injector would create.

    What we set must be there unchanged (defaulting may add fields inside
    it, e.g. a probe's successThreshold); an image may be pinned to a digest
    by a mirror webhook.
    """
    differs = [k for k in actual if k not in expected and k not in _DEFAULTED | _REWRITABLE]
    for key, value in expected.items():
        if key in _REWRITABLE:
            continue
        if key == "image":
            if not _same_image(str(actual.get("image", "")), str(value)):
                differs.append(key)
        elif not _contains(actual.get(key), value):
            differs.append(key)
    return sorted(differs)


def _contains(actual: Any, expected: Any) -> bool:
    if actual is None and expected in ("", 0, [], {}) and expected is not False:
        return True  # the apiserver drops empty values (Go's omitempty)
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            _contains(actual.get(k), v) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(_contains(a, e) for a, e in zip(actual, expected, strict=True))
        )
    return bool(actual == expected)


def _same_image(actual: str, expected: str) -> bool:
    if actual == expected:
        return True
    repository, _, digest = actual.partition("@")
    if not digest.startswith("sha256:"):
        return False
    tagless = expected.rsplit(":", 1)[0] if ":" in expected.rsplit("/", 1)[-1] else expected
    return repository in (expected, tagless)


def _classic_mesh_proxy(ctx: MutationContext) -> list[str]:
    mesh = set(ctx.config.sidecar.mesh_proxy_containers)
    return [
        f"container {c.get('name')!r} is a classic (non-native) mesh proxy: it captures the "
        "pod's traffic but starts after juicefs-mount, which could then never reach JuiceFS. "
        "Use the mesh's native sidecars (Istio: ENABLE_NATIVE_SIDECARS=true; Linkerd: "
        "config.alpha.linkerd.io/proxy-enable-native-sidecar) or opt the pod out"
        for c in ctx.containers("containers")
        if c.get("name") in mesh
    ]


def _model_path_clashes(ctx: MutationContext) -> list[str]:
    target = ctx.config.models.app_mount_path.rstrip("/")
    problems = []
    for key, _, container in ctx.model_consumers():
        for mount in container.get("volumeMounts") or []:
            if not isinstance(mount, dict):
                continue
            if str(mount.get("mountPath", "")).rstrip("/") == target and (
                mount.get("name") != ctx.owned.mount_dir_volume
            ):
                problems.append(
                    f"container {container.get('name')!r} in spec.{key} already mounts volume "
                    f"{mount.get('name')!r} at {target}, where the JuiceFS models are mounted"
                )
    return problems


def find_conflicts(ctx: MutationContext) -> list[str]:
    ours = _forged_parts(ctx) if ctx.plan.already_injected else _name_clashes(ctx)
    return ours + _sidecar_only_mounts(ctx) + _classic_mesh_proxy(ctx) + _model_path_clashes(ctx)
