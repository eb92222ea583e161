"""The `juicefs-mount` container: a native sidecar on 1.29+, a classic one before.

It passes Pod Security `restricted` (non-root, no capabilities) and holds no
Kubernetes credential: it serves the FUSE mount the node agent made for it,
reached through the agent volume, and asks the agent for the rest.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from common import env
from injector.mutation.context import MutationContext
from injector.mutation.metrics_port import METRICS_PORT_NAME
from injector.quantity import parse_quantity

MIB = 2**20
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
# Where the sidecar finds the node agent's socket, and the private FUSE
# mount the agent makes for it (both in the agent volume).
AGENT_SOCKET_PATH = Path(env.AGENT_DIR) / env.AGENT_SOCKET_NAME
AGENT_MOUNT_PATH = Path(env.AGENT_DIR) / env.AGENT_MOUNT_NAME
# Where Kubernetes mounts a service-account token; the sidecar sees an
# (empty) directory of the agent volume there instead.
TOKEN_MOUNT_PATH = env.DEFAULT_TOKEN_DIR
NO_TOKEN_SUBPATH = "no-token"


def _field_env(name: str, field_path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field_path}}}


def _secret_env(name: str, secret: str, key: str, optional: bool) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def sidecar_env(ctx: MutationContext) -> list[dict[str, Any]]:
    """The sidecar's whole configuration, each value rendered by the contract's rule."""
    plan, config = ctx.plan, ctx.config
    jfs = config.juicefs
    node = plan.cache_mode == "node"
    # JuiceFS's --cache-size is a soft limit: kept under the emptyDir's
    # sizeLimit, or under the node budget, by the same ratio.
    limit = config.node_budget_bytes if node else plan.cache_bytes
    cache_mib = int(limit * jfs.cache_fill_ratio) // MIB
    node_cache = [
        env.NODE_CACHE_BUDGET_MIB.entry(config.node_budget_bytes // MIB),
        env.CACHE_SCAN_SECONDS.entry(config.cache.node_scan_seconds),
    ]
    return [
        _field_env(env.POD_NAME.name, "metadata.name"),
        _field_env(env.POD_NAMESPACE.name, "metadata.namespace"),
        _field_env(env.POD_UID.name, "metadata.uid"),
        _field_env(env.NODE_NAME.name, "spec.nodeName"),
        # Credentials stay in the Secret; the pod spec only names it.
        _secret_env(env.META_URL.name, plan.secret_name, jfs.meta_url_key, optional=False),
        _secret_env(env.ACCESS_KEY.name, plan.secret_name, jfs.access_key_key, optional=True),
        _secret_env(env.SECRET_KEY.name, plan.secret_name, jfs.secret_key_key, optional=True),
        env.BENTO_NAME.entry(plan.bento_name),
        env.BENTO_VERSION.entry(plan.bento_version),
        env.VOLUME.entry(plan.volume),
        env.BENTO_PATH.entry(plan.juicefs_path),
        env.MODELS.entry(plan.models),
        env.MOUNT_POINT.entry(Path(config.volumes.mount_path)),
        env.CACHE_DIR.entry(Path(config.volumes.cache_path)),
        env.CACHE_MODE.entry(plan.cache_mode),
        env.CACHE_SIZE_MIB.entry(cache_mib),
        *(node_cache if node else []),
        env.BUFFER_SIZE_MIB.entry(jfs.buffer_size_mib),
        env.PREFETCH.entry(jfs.prefetch),
        env.SSD_POLICY.entry(plan.ssd_policy),
        env.CACHE_MIN_MBPS.entry(config.warmup.cache_min_mbps),
        env.WARMUP.entry(plan.warmup),
        env.WARMUP_TIMEOUT_SECONDS.entry(plan.warmup_timeout_seconds),
        env.WARMUP_CONCURRENCY.entry(config.warmup.concurrency),
        env.CONDITION_TYPE.entry(config.readiness.condition_type),
        env.METRICS_PORT.entry(ctx.metrics_port),
        *agent_env(),
    ]


def agent_env() -> list[dict[str, Any]]:
    """The sidecar's way to its mount: the agent's socket, and where the agent mounts."""
    return [
        env.AGENT_SOCKET.entry(AGENT_SOCKET_PATH),
        env.PRIVATE_MOUNT.entry(AGENT_MOUNT_PATH),
    ]


def sidecar_resources(ctx: MutationContext) -> dict[str, Any]:
    res = ctx.plan.resources
    requests = {"cpu": res.cpu_request, "memory": res.memory_request}
    limits: dict[str, str] = {}
    if res.cpu_limit:
        limits["cpu"] = res.cpu_limit
    if res.memory_limit:
        limits["memory"] = res.memory_limit
    # The node cache has its own budget (cache.nodeBudget): a pod requests nothing for it.
    if ctx.plan.cache_mode == "pod":
        if ctx.config.volumes.cache_medium == "Memory":
            # tmpfs pages are charged to the container's memory, not to ephemeral storage.
            for bucket in (requests, limits):
                if "memory" in bucket:
                    total = parse_quantity(bucket["memory"]) + ctx.plan.cache_bytes
                    bucket["memory"] = str(int(total))
        else:
            # The cache lives in an emptyDir on the node's disk; requesting it
            # makes the scheduler place the pod only where the cache fits.
            requests["ephemeral-storage"] = ctx.plan.cache_size
    return {"requests": requests, "limits": limits} if limits else {"requests": requests}


def sidecar_mounts(ctx: MutationContext) -> list[dict[str, Any]]:
    """The node agent mounts on the host side of each volume; the sidecar only sees them.

    HostToContainer everywhere: Bidirectional needs a privileged container,
    and the mounts the agent makes on the host (the models in the mount dir,
    the node cache bind-mounted onto the cache, its FUSE mount in the agent
    volume) reach the sidecar that way. No token: the sidecar holds no
    Kubernetes credential, it asks the node agent through its socket.
    """
    owned, paths = ctx.owned, ctx.config.volumes
    return [
        {
            "name": owned.mount_dir_volume,
            "mountPath": paths.mount_path,
            "mountPropagation": "HostToContainer",
        },
        {
            "name": owned.cache_volume,
            "mountPath": paths.cache_path,
            "mountPropagation": "HostToContainer",
        },
        {
            "name": owned.agent_volume,
            "mountPath": env.AGENT_DIR,
            "mountPropagation": "HostToContainer",
        },
        # Something at the token's path, so that the ServiceAccount admission
        # plugin, which the apiserver runs again after this webhook, does not
        # mount the pod's token here: an empty directory of our own volume.
        {
            "name": owned.agent_volume,
            "mountPath": TOKEN_MOUNT_PATH,
            "subPath": NO_TOKEN_SUBPATH,
            "readOnly": True,
        },
    ]


def sidecar_security_context() -> dict[str, Any]:
    """Pod Security `restricted`, every field set, so nothing of the pod's own is inherited.

    The uid is fixed, whatever the pod's runAsUser: the image's own user, the
    one the node agent mounts FUSE for.
    """
    return {
        "runAsNonRoot": True,
        "runAsUser": env.SIDECAR_UID,
        "runAsGroup": env.SIDECAR_UID,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def sidecar_container(ctx: MutationContext) -> dict[str, Any]:
    config, owned = ctx.config, ctx.owned
    side = config.sidecar
    container: dict[str, Any] = {
        "name": owned.container,
        "image": side.image,
        "imagePullPolicy": side.image_pull_policy,
        "command": list(side.command),
        "env": sidecar_env(ctx),
        "resources": sidecar_resources(ctx),
        "volumeMounts": sidecar_mounts(ctx),
        "securityContext": sidecar_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if ctx.metrics_port:
        container["ports"] = [
            {"name": METRICS_PORT_NAME, "containerPort": ctx.metrics_port, "protocol": "TCP"}
        ]
    probe_cmd = list(side.probe_command)
    startup = startup_seconds(ctx)
    if ctx.plan.sidecar_mode == "native":
        container["restartPolicy"] = "Always"
        container["startupProbe"] = startup_probe(probe_cmd, startup, ctx.metrics_port)
    else:
        # The kubelet starts the next container only after postStart
        # returns, so a blocking check holds the app until the mount exists.
        wait = [*probe_cmd, "--wait", f"--timeout={startup}"]
        container["lifecycle"] = {"postStart": {"exec": {"command": wait}}}
    return container


def startup_probe(command: list[str], seconds: int, metrics_port: int) -> dict[str, Any]:
    """The native sidecar's startup probe: passes once the app's models are shown (the
    mount answers, or the node's copy is bound), within `seconds`.

    Where the sidecar serves metrics, the kubelet's own HTTP GET of
    STARTUP_PATH on that port, answered from the sidecar's memory; else (no
    port: hostNetwork, the port taken, metrics off) `command --wait`, a
    process in the container per run (0.2-0.5 s on two cores, BENCHMARKS.md).
    Each run waits for the models (up to env.STARTUP_WAIT_SECONDS) instead of
    failing at once: the app starts the moment they are shown, and a cold
    node's warm shows as one Unhealthy Event every 20 s, not every second.
    """
    action: dict[str, Any] = (
        {"httpGet": {"path": env.STARTUP_PATH, "port": METRICS_PORT_NAME}}
        if metrics_port
        else {"exec": {"command": [*command, "--wait", f"--timeout={env.STARTUP_WAIT_SECONDS}"]}}
    )
    return {
        **action,
        "periodSeconds": 1,
        "timeoutSeconds": env.STARTUP_WAIT_SECONDS + 5,
        "failureThreshold": math.ceil(seconds / env.STARTUP_WAIT_SECONDS) + 1,
    }


def startup_seconds(ctx: MutationContext) -> int:
    """How long the app's containers may wait for the models to appear.

    The mount's timeout; plus the warmup's when the sidecar mounts only once
    the node agent has sealed the models (common.env.seals_before_mount),
    since a cold node streams first.
    """
    mount = ctx.config.sidecar.mount_timeout_seconds
    if env.seals_before_mount(ctx.plan.cache_mode == "node", ctx.plan.warmup):
        return mount + ctx.plan.warmup_timeout_seconds
    return mount


def add_sidecar(ctx: MutationContext) -> None:
    if ctx.sidecar_index() is not None:
        return
    container = sidecar_container(ctx)
    if ctx.plan.sidecar_mode == "native":
        ctx.patch.insert(("spec", "initContainers"), ctx.native_insert_index(), container)
    else:
        ctx.patch.insert(("spec", "containers"), 0, container)
        # With the sidecar first, kubectl logs/exec would default to it.
        apps = ctx.containers("containers")
        annotations = (ctx.pod.get("metadata") or {}).get("annotations") or {}
        if apps and DEFAULT_CONTAINER not in annotations:
            ctx.patch.set(("metadata", "annotations", DEFAULT_CONTAINER), str(apps[0].get("name")))
