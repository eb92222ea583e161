"""The kubelet STAND-IN: runs a stored pod's injected `juicefs-mount` sidecar as a local process.

The local control plane has no kubelet, so nothing would ever run the sidecar
the webhook injected. This stand-in does the kubelet's part for that one
container, and only that: it reads the pod from the apiserver, resolves the
container's env the way the kubelet would (plain values with $(VAR)
expansion, fieldRef metadata.name/namespace/uid/labels/annotations and
spec.nodeName/serviceAccountName, secretKeyRef/configMapKeyRef from the pod's
namespace, envFrom), asks the TokenRequest API for a service-account token
bound to the pod (what the projected token volume holds), and starts the
container's command (`python -m sidecar run`) on this host.

What differs from a real node, and why: the container's paths (mount point,
cache dir, private JuiceFS mount, the juicefs binary, the token dir) point
at host temp dirs; KUBERNETES_SERVICE_HOST/PORT point at the local
apiserver; there is no image, no container, no mount namespace, so the FUSE
and bind mounts are made in the host's mount namespace.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.mounts import is_mounted, unmount
from common.processes import log_tail
from devcluster.cluster import Cluster
from devcluster.services import storage_binaries
from sidecar import env as contract

REPO = Path(__file__).resolve().parent.parent
CONTAINER = "juicefs-mount"
BANNER = "kubelet stand-in"


class KubeletError(RuntimeError):
    """The pod cannot be started the way the kubelet would (the message says why)."""


def _say(message: str) -> None:
    print(f"[{BANNER} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def apiserver(cluster: Cluster) -> tuple[str, bytes]:
    """(server URL, CA bundle PEM) of the cluster's current kubeconfig context."""
    config = json.loads(cluster.kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
    details = config["clusters"][0]["cluster"]
    if "certificate-authority-data" in details:
        ca = base64.b64decode(details["certificate-authority-data"])
    elif "certificate-authority" in details:
        ca = Path(details["certificate-authority"]).read_bytes()
    else:
        raise KubeletError("the kubeconfig has no certificate authority for the apiserver")
    return str(details["server"]), ca


def bound_token(
    cluster: Cluster, namespace: str, service_account: str, pod: str, uid: str, duration: str = "1h"
) -> str:
    """A TokenRequest token bound to the pod (what the kubelet projects into it)."""
    return cluster.kubectl(
        "create",
        "token",
        service_account,
        "-n",
        namespace,
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        pod,
        "--bound-object-uid",
        uid,
        f"--duration={duration}",
    ).stdout.strip()


_FIELD_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def _field(pod: Mapping[str, Any], path: str) -> str:
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
    }
    if path in simple:
        return str(simple[path] or "")
    match = _FIELD_SUBSCRIPT.match(path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise KubeletError(f"fieldRef {path!r} is not supported by the {BANNER}")


def _expand(value: str, resolved: Mapping[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined vars are replaced, $$ escapes a $."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return resolved.get(name, match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, value)


class _Objects:
    """Secrets and ConfigMaps of one namespace, each fetched once."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self._cache: dict[tuple[str, str], dict[str, str] | None] = {}

    def data(self, kind: str, name: str) -> dict[str, str] | None:
        key = (kind, name)
        if key not in self._cache:
            proc = self.cluster.kubectl(
                "get", kind, name, "-n", self.namespace, "-o", "json", check=False
            )
            if proc.returncode != 0:
                self._cache[key] = None
            else:
                obj = json.loads(proc.stdout)
                if kind == "secret":
                    self._cache[key] = {
                        k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()
                    }
                else:
                    self._cache[key] = dict(obj.get("data") or {})
        return self._cache[key]

    def value(self, kind: str, ref: Mapping[str, Any]) -> str | None:
        name, key, optional = ref.get("name", ""), ref["key"], bool(ref.get("optional"))
        data = self.data(kind, name)
        if data is None or key not in data:
            if optional:
                return None
            what = f"{kind} {self.namespace}/{name}"
            raise KubeletError(
                f"CreateContainerConfigError: {what} not found"
                if data is None
                else f"CreateContainerConfigError: couldn't find key {key} in {what}"
            )
        return data[key]


def resolve_env(
    cluster: Cluster, pod: Mapping[str, Any], container: Mapping[str, Any]
) -> dict[str, str]:
    """The container's environment as the kubelet would build it."""
    objects = _Objects(cluster, pod["metadata"]["namespace"])
    resolved: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, ref_key in (("secret", "secretRef"), ("configmap", "configMapRef")):
            ref = source.get(ref_key)
            if ref is None:
                continue
            data = objects.data(kind, ref["name"])
            if data is None and not ref.get("optional"):
                raise KubeletError(f"CreateContainerConfigError: {kind} {ref['name']} not found")
            resolved.update({prefix + k: v for k, v in (data or {}).items()})
    for item in container.get("env") or []:
        name = item["name"]
        source = item.get("valueFrom")
        if source is None:
            resolved[name] = _expand(item.get("value", ""), resolved)
        elif "fieldRef" in source:
            resolved[name] = _field(pod, source["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in source:
            value = objects.value("secret", source["secretKeyRef"])
            if value is not None:
                resolved[name] = value
        elif "configMapKeyRef" in source:
            value = objects.value("configmap", source["configMapKeyRef"])
            if value is not None:
                resolved[name] = value
        else:
            raise KubeletError(f"env {name}: {sorted(source)} is not supported by the {BANNER}")
    return resolved


def find_container(pod: Mapping[str, Any], name: str = CONTAINER) -> dict[str, Any]:
    spec = pod["spec"]
    for group in ("initContainers", "containers"):
        for container in spec.get(group) or []:
            if container.get("name") == name:
                return dict(container)
    raise KubeletError(
        f"pod {pod['metadata']['namespace']}/{pod['metadata']['name']} has no container {name!r} "
        "(was it injected?)"
    )


def _children(pid: int) -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == pid:
            found.append((int(entry.name), comm))
    return found


@dataclass
class SidecarProcess:
    """A running stand-in sidecar: the process, its log and the host paths it uses."""

    namespace: str
    pod: str
    process: subprocess.Popen[bytes]
    log_path: Path
    work_dir: Path
    mount_point: Path
    private_mount: Path
    cache_dir: Path
    token_dir: Path
    env: dict[str, str] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def juicefs_pids(self) -> list[int]:
        """The `juicefs mount` processes the sidecar started."""
        return [pid for pid, comm in _children(self.pid) if comm == "juicefs"]

    def mounts(self) -> list[Path]:
        """Which of the sidecar's mount points are still mounted."""
        return [p for p in (self.mount_point, self.private_mount) if is_mounted(p)]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as the kubelet sends on pod deletion; the exit code."""
        if self.process.poll() is None:
            _say(f"SIGTERM to the sidecar of {self.namespace}/{self.pod} (pid {self.pid})")
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def cleanup(self) -> None:
        """Kill whatever is left (sidecar, juicefs) and remove leftover mounts."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        for path in (self.mount_point, self.private_mount):
            with contextlib.suppress(Exception):
                unmount(path)


def run_sidecar(
    cluster: Cluster,
    namespace: str,
    pod_name: str,
    work_dir: Path | None = None,
    *,
    juicefs_bin: Path | None = None,
    container_name: str = CONTAINER,
    extra_env: Mapping[str, str] | None = None,
) -> SidecarProcess:
    """Start the pod's injected sidecar on this host, as the kubelet would; returns its handle."""
    pod = cluster.get_json("pod", pod_name, "-n", namespace)
    uid = pod["metadata"]["uid"]
    if not pod["spec"].get("nodeName"):
        raise KubeletError(f"pod {namespace}/{pod_name} is not bound to a node yet")
    container = find_container(pod, container_name)
    command = [*container.get("command", []), *container.get("args", [])]
    if not command:
        raise KubeletError(f"container {container_name} has no command (the image's would run)")
    if Path(command[0]).name.startswith("python"):
        command[0] = sys.executable  # the image's python is this venv's python here

    work = Path(work_dir or tempfile.mkdtemp(prefix=f"kubelet-{pod_name}-"))
    work.mkdir(parents=True, exist_ok=True)
    token_dir = work / "serviceaccount"
    token_dir.mkdir(exist_ok=True)
    server, ca = apiserver(cluster)
    service_account = pod["spec"].get("serviceAccountName") or "default"
    (token_dir / "token").write_text(
        bound_token(cluster, namespace, service_account, pod_name, uid)
    )
    (token_dir / "ca.crt").write_bytes(ca)
    (token_dir / "namespace").write_text(namespace)

    env = resolve_env(cluster, pod, container)
    paths = {
        contract.MOUNT_POINT: work / "mnt",
        contract.CACHE_DIR: work / "cache",
        contract.PRIVATE_MOUNT: work / "volume",
        contract.TOKEN_DIR: token_dir,
        contract.JUICEFS_BIN: Path(juicefs_bin or storage_binaries()["juicefs"]),
    }
    env.update({k: str(v) for k, v in paths.items()})
    url = urllib.parse.urlsplit(server)
    env["KUBERNETES_SERVICE_HOST"] = url.hostname or "127.0.0.1"
    env["KUBERNETES_SERVICE_PORT"] = str(url.port or 443)
    env.update(extra_env or {})
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TZ") if k in os.environ}

    log_path = work / f"{container_name}.log"
    _say(
        f"starting container {container_name} of pod {namespace}/{pod_name} as a local process "
        f"(no kubelet here): {' '.join(command)}; log {log_path}"
    )
    with log_path.open("ab") as out:
        process = subprocess.Popen(
            command,
            env={**base, **env},
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return SidecarProcess(
        namespace=namespace,
        pod=pod_name,
        process=process,
        log_path=log_path,
        work_dir=work,
        mount_point=paths[contract.MOUNT_POINT],
        private_mount=paths[contract.PRIVATE_MOUNT],
        cache_dir=paths[contract.CACHE_DIR],
        token_dir=token_dir,
        env=env,
    )
