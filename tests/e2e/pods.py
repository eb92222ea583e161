"""Helpers for e2e tests whose pods really run: events, conditions, exec, HTTP to pods.

And the e2e tests' builders: opted-in namespaces, Bento pods and Deployments
whose app checks a model file's sha256 (every e2e module takes them from
here, none from another test module).
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.processes import processes_named
from devcluster import Cluster, wait_for
from devcluster.images import SAMPLE_BENTO_IMAGE
from devcluster.installs.injector_install import NAMESPACE as AGENT_NAMESPACE
from devcluster.installs.node_agent import SELECTOR as AGENT_SELECTOR
from modelstore.manifest import Manifest

GATE = "juicefs.bentoml.com/models-ready"
SIDECAR = "juicefs-mount"
# Where the app containers read the Bento's models (the injector's default).
MODELS_PATH = "/home/bentoml/bento/models"
# How a debug line of the node agent's JSON log reads (left out of diagnoses).
DEBUG = '"level": "debug"'


def get_pod(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    pod: dict[str, Any] = cluster.get_json("pod", name, "-n", namespace)
    return pod


def kubectl_create(
    cluster: Cluster, namespace: str, obj: dict[str, Any], *extra: str
) -> subprocess.CompletedProcess[str]:
    """`kubectl create` of obj (extra: more flags), unchecked: the caller reads the result."""
    return cluster.kubectl(
        "create", "-n", namespace, "-f", "-", *extra, input=json.dumps(obj), check=False
    )


def conditions(pod: dict[str, Any]) -> dict[str, str]:
    """Condition type -> status."""
    return {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions") or []}


def condition(pod: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in pod.get("status", {}).get("conditions") or []:
        if c["type"] == kind:
            return dict(c)
    return None


def container_status(pod: dict[str, Any], name: str) -> dict[str, Any]:
    status = pod.get("status", {})
    for group in ("initContainerStatuses", "containerStatuses"):
        for found in status.get(group) or []:
            if found["name"] == name:
                return dict(found)
    raise AssertionError(f"no status for container {name}: {json.dumps(status)[:2000]}")


def events(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    """The pod's Events, oldest first (as `kubectl describe` lists them)."""
    items: list[dict[str, Any]] = cluster.get_json(
        "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}"
    )["items"]
    return sorted(
        items,
        key=lambda e: (
            e.get("firstTimestamp") or e.get("eventTime") or "",
            e["metadata"].get("creationTimestamp") or "",
            int(e["metadata"].get("resourceVersion") or 0),
        ),
    )


def reasons(cluster: Cluster, namespace: str, name: str) -> list[str]:
    return [e["reason"] for e in events(cluster, namespace, name)]


def wait_event(
    cluster: Cluster, namespace: str, name: str, reason: str, timeout: float = 120
) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        return next((e for e in events(cluster, namespace, name) if e["reason"] == reason), None)

    return wait_for(found, timeout=timeout, interval=0.5, what=f"Event {reason} on pod {name}")


def logs(cluster: Cluster, namespace: str, name: str, container: str = SIDECAR) -> str:
    proc = cluster.kubectl("logs", name, "-n", namespace, "-c", container, check=False)
    return proc.stdout + proc.stderr


def wait_log(
    cluster: Cluster, namespace: str, name: str, container: str, text: str, timeout: float = 30
) -> str:
    """The container's log once it contains text (a container is Ready before it prints).

    AssertionError with the pod's diagnosis if it never does.
    """
    deadline = time.monotonic() + timeout
    while True:
        out = logs(cluster, namespace, name, container)
        if text in out:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{container} never logged {text!r} in {timeout:.0f}s:\n"
                f"{diagnose(cluster, namespace, name)}"
            )
        time.sleep(0.3)


def diagnose(cluster: Cluster, namespace: str, name: str) -> str:
    """describe + the sidecar's log + the node agent's, for assertion messages."""
    describe = cluster.kubectl("describe", "pod", name, "-n", namespace, check=False).stdout
    agent = cluster.kubectl(
        "logs", "-n", AGENT_NAMESPACE, "-l", AGENT_SELECTOR, "--tail=1000", check=False
    )
    said = [line for line in (agent.stdout + agent.stderr).splitlines() if DEBUG not in line]
    return (
        f"{describe}\n--- {SIDECAR} log ---\n{logs(cluster, namespace, name)[-4000:]}"
        f"\n--- node agent log (no debug) ---\n" + "\n".join(said[-40:])
    )


def wait_pod(
    cluster: Cluster,
    namespace: str,
    name: str,
    done: Callable[[dict[str, Any]], bool],
    *,
    timeout: float,
    what: str,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        proc = cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
        if proc.returncode == 0:
            pod: dict[str, Any] = json.loads(proc.stdout)
            if done(pod):
                return pod
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}\n"
                f"{diagnose(cluster, namespace, name)}"
            )
        time.sleep(0.3)


def is_ready(pod: dict[str, Any]) -> bool:
    return conditions(pod).get("Ready") == "True"


def exec_in(
    cluster: Cluster, namespace: str, pod: str, container: str, *command: str
) -> tuple[int, str]:
    """`kubectl exec`: (exit code, stdout+stderr)."""
    proc = cluster.kubectl(
        "exec", pod, "-n", namespace, "-c", container, "--", *command, check=False, timeout=60
    )
    return proc.returncode, proc.stdout + proc.stderr


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    """POST (or GET without a body) JSON to a pod IP; only the node's own addresses."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass
class Sample:
    """One look at a pod and its Service's EndpointSlices while it starts."""

    at: float
    conditions: dict[str, str]
    ready_endpoint: bool


@dataclass
class StartupWatch:
    """Samples of a pod's conditions and whether its Service lists it as a ready endpoint."""

    cluster: Cluster
    namespace: str
    service: str
    samples: list[Sample] = field(default_factory=list)

    def sample(self, pod: dict[str, Any]) -> Sample:
        ip = pod.get("status", {}).get("podIP")
        slices = self.cluster.get_json(
            "endpointslices",
            "-n",
            self.namespace,
            "-l",
            f"kubernetes.io/service-name={self.service}",
        )["items"]
        ready = any(
            ip in endpoint.get("addresses", [])
            and (endpoint.get("conditions") or {}).get("ready") is True
            for s in slices
            for endpoint in s.get("endpoints") or []
        )
        found = Sample(time.monotonic(), conditions(pod), ready)
        self.samples.append(found)
        return found

    def until_ready(self, name: str, timeout: float) -> dict[str, Any]:
        def ready(pod: dict[str, Any]) -> bool:
            return self.sample(pod).ready_endpoint and is_ready(pod)

        return wait_pod(
            self.cluster, self.namespace, name, ready, timeout=timeout, what=f"pod {name} Ready"
        )


def bento_deployment(
    name: str,
    labels: dict[str, str],
    command: list[str],
    replicas: int,
    annotations: dict[str, str] | None = None,
    strategy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Deployment of the sample Bento image: pods labelled labels (+ app=name) running command."""
    spec: dict[str, Any] = {
        "replicas": replicas,
        "selector": {"matchLabels": {"app": name}},
        "template": {
            "metadata": {"labels": {**labels, "app": name}, "annotations": annotations or {}},
            "spec": {
                "terminationGracePeriodSeconds": 20,
                "containers": [
                    {
                        "name": "main",
                        "image": SAMPLE_BENTO_IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "command": command,
                    }
                ],
            },
        },
    }
    if strategy is not None:
        spec["strategy"] = strategy
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name}, "spec": spec}


# An image no node pulls: pods of it are for admission (dry runs, denials) only.
ADMISSION_IMAGE = "us-docker.pkg.dev/acme/bentos/llama3:v1"


# A node label no node carries.
NOWHERE = {"e2e.bento-juicefs/nowhere": "true"}


def bento_pod(name: str, **annotations: str) -> dict[str, Any]:
    """A Bento pod for admission only (ADMISSION_IMAGE), with annotations as given.

    Its Bento is published nowhere, so it stays off every node (`placed`
    undoes that, to test scheduling): a node agent seeing it there would
    start its seal and record a failed warm on the Node.
    """
    spec: dict[str, Any] = {
        "containers": [{"name": "main", "image": ADMISSION_IMAGE}],
        "nodeSelector": NOWHERE,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": bento_labels("llama3-service", "v1"),
            "annotations": annotations,
        },
        "spec": spec,
    }


def placed(pod: dict[str, Any]) -> dict[str, Any]:
    """bento_pod for the scheduler to place: without its nowhere nodeSelector."""
    pod["spec"].pop("nodeSelector", None)
    return pod


def pod_cache_dir(node_dir: Path, pod_uid: str) -> Path:
    """Where the kubelet keeps a pod-cache pod's juicefs-cache emptyDir on the node."""
    return (
        node_dir / "kubelet" / "pods" / pod_uid / "volumes" / "kubernetes.io~empty-dir"
        / "juicefs-cache"
    )  # fmt: skip


# Pods in namespaces that enforce a Pod Security level (the sidecar passes restricted).

OPT_IN = {"juicefs.bentoml.com/injection": "enabled"}
ENFORCE = "pod-security.kubernetes.io/enforce"


def bento_labels(name: str, version: str) -> dict[str, str]:
    """The labels of a JuiceFS Bento's pod: the model-store mark and the Bento's identity."""
    return {
        "juicefs.bentoml.com/model-store": "juicefs",
        "yatai.ai/bento-repository": name,
        "yatai.ai/bento-version": version,
    }


@contextmanager
def opted_in_namespace(cluster: Cluster, prefix: str, *, provisioned: bool = True) -> Iterator[str]:
    """A new namespace `<prefix>-<6 hex>`, opted in to injection; deleted afterwards
    (without waiting). provisioned: wait until the injector has provisioned it
    (the tenant's credentials and RBAC), as a pod that mounts needs."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.create_namespace(name, OPT_IN)
    if provisioned:
        cluster.wait_provisioned(name)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def namespace_enforcing(cluster: Cluster, level: str, prefix: str = "e2e") -> str:
    """A new opted-in namespace that enforces Pod Security `level`, provisioned."""
    name = f"{prefix}-{level}-{uuid.uuid4().hex[:6]}"
    cluster.create_namespace(name, {**OPT_IN, ENFORCE: level})
    cluster.wait_provisioned(name)
    return name


def check_command(path: str, sha256: str, then: str = "exec sleep 3600") -> list[str]:
    """sh: exit 1 unless the model file's sha256 is the published one, then `then`."""
    script = (
        f'got=$(sha256sum "{MODELS_PATH}/{path}" | cut -d" " -f1) || exit 2; '
        f'if [ "$got" != "{sha256}" ]; then echo "sha256 $got != {sha256}"; exit 1; fi; '
        f"echo verified {path}; {then}"
    )
    return ["sh", "-c", script]


def checking_container(
    model: Manifest, then: str = "exec sleep 3600", **extra: Any
) -> dict[str, Any]:
    """The sample Bento's app container: checks the model's largest file, then `then`."""
    shard = max(model.files, key=lambda f: f.size)
    return {
        "name": "main",
        "image": SAMPLE_BENTO_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": check_command(shard.path, shard.sha256, then=then),
        **extra,
    }


def pod_manifest(
    name: str, labels: dict[str, str], spec: dict[str, Any], **annotations: str
) -> dict[str, Any]:
    """A Bento pod of spec (a 20s grace period), with a 1Gi cache unless annotated otherwise."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {"juicefs.bentoml.com/cache-size": "1Gi", **annotations},
        },
        "spec": {"terminationGracePeriodSeconds": 20, **spec},
    }


def checking_deployment(
    name: str, labels: dict[str, str], model: Manifest, replicas: int, **options: Any
) -> dict[str, Any]:
    """bento_deployment whose pods check the model's largest file, then sleep
    (options: bento_deployment's annotations and strategy)."""
    shard = max(model.files, key=lambda f: f.size)
    command = check_command(shard.path, shard.sha256)
    return bento_deployment(name, labels, command, replicas, **options)


def checking_pod(
    name: str,
    labels: dict[str, str],
    path: str,
    sha256: str,
    *,
    restricted: bool = False,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Bento pod whose app checks one model file's sha256, then sleeps.

    restricted: the app's own containers pass Pod Security `restricted` too.
    """
    container: dict[str, Any] = {
        "name": "main",
        "image": SAMPLE_BENTO_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": check_command(path, sha256),
    }
    spec: dict[str, Any] = {"terminationGracePeriodSeconds": 10, "containers": [container]}
    if restricted:
        spec["securityContext"] = {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        container["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations or {}},
        "spec": spec,
    }


def create_pod(cluster: Cluster, namespace: str, pod: dict[str, Any]) -> None:
    created = cluster.kubectl(
        "create", "-n", namespace, "-f", "-", input=json.dumps(pod), check=False
    )
    assert created.returncode == 0, created.stderr


def run_until_ready(
    cluster: Cluster, namespace: str, pod: dict[str, Any], timeout: float = 180
) -> dict[str, Any]:
    """Create pod and wait until it is Ready (the gate open); its JSON then."""
    create_pod(cluster, namespace, pod)
    name = pod["metadata"]["name"]
    return wait_pod(cluster, namespace, name, is_ready, timeout=timeout, what=f"pod {name} Ready")


def apiserver(cluster: Cluster) -> tuple[str, bytes]:
    """(server URL, CA bundle PEM) of the cluster's current kubeconfig context."""
    config = json.loads(cluster.kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
    details = config["clusters"][0]["cluster"]
    if "certificate-authority-data" in details:
        return str(details["server"]), base64.b64decode(details["certificate-authority-data"])
    return str(details["server"]), Path(details["certificate-authority"]).read_bytes()


class PodIdentity:
    """kubectl with only a TokenRequest token bound to one pod (what the kubelet projects)."""

    def __init__(self, cluster: Cluster, namespace: str, pod: str, work: Path) -> None:
        self.cluster = cluster
        self.namespace = namespace
        uid = get_pod(cluster, namespace, pod)["metadata"]["uid"]
        self.token = cluster.kubectl(
            "create", "token", "default", "-n", namespace, "--bound-object-kind", "Pod",
            "--bound-object-name", pod, "--bound-object-uid", uid, "--duration=10m",
        ).stdout.strip()  # fmt: skip
        self.server, ca = apiserver(cluster)
        self.ca_file = work / f"{pod}-ca.crt"
        self.ca_file.write_bytes(ca)
        self.empty_config = work / "empty.kubeconfig"
        self.empty_config.write_text("apiVersion: v1\nkind: Config\n")

    def kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                self.cluster.kubectl_path,
                f"--kubeconfig={self.empty_config}",
                f"--server={self.server}",
                f"--certificate-authority={self.ca_file}",
                f"--token={self.token}",
                "-n",
                self.namespace,
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def patch_status(self, pod: str, patch: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return self.kubectl(
            "patch", "pod", pod, "--subresource=status", "--type=strategic", "-p", json.dumps(patch)
        )


def juicefs_pids(pod_uid: str) -> list[int]:
    """The juicefs processes of one pod (by the pod's cgroup)."""
    found = []
    for pid in processes_named("juicefs"):
        try:
            cgroups = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            continue
        if pod_uid.replace("-", "_") in cgroups or pod_uid in cgroups:
            found.append(pid)
    return found
