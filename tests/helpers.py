"""Shared test helpers: build pods, run the webhook decision, apply its patch."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from common.processes import processes_named
from devcluster.storage.redis import RedisUnavailable, find_redis_server
from devcluster.storage.stack import StorageStack
from injector.admission import ReviewResult, pod_review_request, review
from injector.config import InjectorConfig, load_config
from injector.render import TEMPLATE_PATHS, Rendered, RenderError, render_text

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN_CASES = sorted(GOLDEN_DIR.glob("*.yaml"))
SELECTED = "juicefs.bentoml.com/model-store"


def bento_pod(name: str = "llama", **spec: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "serving",
            "labels": {
                SELECTED: "juicefs",
                "yatai.ai/bento-repository": "llama3-service",
                "yatai.ai/bento-version": "v1",
            },
        },
        "spec": {"containers": [{"name": "main", "image": "us-docker.pkg.dev/p/r/llama:1"}]},
    }
    pod["spec"].update(spec)
    return pod


def run(
    pod: dict[str, Any], config: InjectorConfig | None = None, namespace: str = "serving"
) -> ReviewResult:
    return review(pod_review_request(pod, namespace), config or InjectorConfig())


def inject(pod: dict[str, Any], config: InjectorConfig | None = None) -> dict[str, Any]:
    result = run(pod, config)
    assert result.outcome == "injected", result.reason
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, result.ops)
    return patched


def case_config(case: Path) -> InjectorConfig:
    config_file = case.with_name(case.name.removesuffix(".yaml") + ".config")
    return load_config(config_file) if config_file.exists() else InjectorConfig()


def render_case(case: Path) -> Rendered | None:
    """A golden case rendered with its config; None when the injector denies it."""
    try:
        return render_text(case.read_text(), case_config(case))
    except RenderError:
        return None


def injected_pods(case: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(namespace, pod) for every pod of a golden case that the injector injects."""
    rendered = render_case(case)
    if rendered is None:
        return
    ours = case_config(case).sidecar.container_name
    for document in rendered.documents:
        namespace = (document.get("metadata") or {}).get("namespace") or "default"
        for pod in pods_of(document):
            spec = pod.get("spec") or {}
            containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
            if any(c.get("name") == ours for c in containers):
                yield namespace, pod


def pods_of(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The pod, or the workload's pod template, in a rendered document."""
    if document.get("kind") == "Pod":
        yield document
        return
    path = TEMPLATE_PATHS.get(str(document.get("kind")))
    if path is None:
        return
    node: Any = document
    for key in path:
        node = node[key]
    yield node


@contextmanager
def storage_stack(work: Path) -> Iterator[StorageStack]:
    """MinIO + Redis + a JuiceFS volume under work, removed afterwards (skip without Redis)."""
    try:
        find_redis_server()
    except RedisUnavailable as err:
        pytest.skip(str(err))
    with StorageStack(work) as stack:
        yield stack
    shutil.rmtree(work, ignore_errors=True)  # gigabytes of objects and caches


def minimal_env(**extra: str) -> dict[str, str]:
    """The sidecar env with only what it requires (and `extra`)."""
    return {
        "POD_NAME": "p",
        "POD_NAMESPACE": "n",
        "JFS_META_URL": "redis://x",
        "BENTO_NAME": "b",
        "BENTO_VERSION": "v",
        "JFS_BENTO_PATH": "/bentos/b/v",
        "JFS_MOUNT_POINT": "/m",
        "JFS_CACHE_DIR": "/c",
        "JFS_CONDITION_TYPE": "x/y",
        "JFS_AGENT_SOCKET": "/run/bento-juicefs/agent/agent.sock",
        **extra,
    }


def flip_middle_byte(path: Path) -> None:
    """Corrupt a file as bit rot would: same size, one byte changed, so its sha256 differs."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def fuse_servers(pod_namespace: str) -> list[tuple[int, str]]:
    """(uid, CapEff) of every juicefs serving FUSE for a sidecar of pod_namespace.

    Found by what they hold (a /dev/fuse descriptor) and inherit (the
    sidecar's POD_NAMESPACE): juicefs rewrites its argv into one truncated
    string, so the command line cannot say.
    """
    found = []
    for pid in processes_named("juicefs"):
        try:
            fds = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if "/dev/fuse" not in fds or f"POD_NAMESPACE={pod_namespace}".encode() not in environ:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        found.append((int(fields["Uid"].split()[0]), fields["CapEff"].strip()))
    return found


def sidecar_of(pod: dict[str, Any]) -> dict[str, Any]:
    """The injected juicefs-mount container of a pod (native or classic)."""
    for key in ("initContainers", "containers"):
        for container in pod["spec"].get(key) or []:
            if container["name"] == "juicefs-mount":
                return dict(container)
    raise AssertionError("no sidecar")


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """A container's env: name -> value, or its valueFrom."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# Pod Security `restricted` (v1.30): the volume types it allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """What Pod Security `restricted` says about one container of the pod (and its volumes).

    The checks of the standard that a container or a volume can fail, read
    with the pod's own securityContext as the fallback, as the plugin does.
    """
    spec = pod["spec"]
    pod_context = spec.get("securityContext") or {}
    context = container.get("securityContext") or {}
    problems = []
    if context.get("privileged"):
        problems.append("privileged")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation != false")
    capabilities = context.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        problems.append("capabilities not dropping ALL")
    if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
        problems.append("capabilities added")
    if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
        problems.append("runAsNonRoot != true")
    if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
        problems.append("runAsUser=0")
    seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append("seccompProfile")
    if any(port.get("hostPort") for port in container.get("ports") or []):
        problems.append("hostPort")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']} is {'/'.join(sorted(kinds))}")
    return problems
