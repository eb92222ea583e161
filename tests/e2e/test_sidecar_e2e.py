"""The injected sidecar end to end: real apiserver, real JuiceFS over MinIO + Redis.

The webhook injects the `juicefs-mount` sidecar into a Bento pod; the pod is
scheduled onto a (kubelet-less) fake SSD node; then the KUBELET STAND-IN
(devcluster/kubelet.py) runs that sidecar as a local process with the env
and command from the stored pod spec and a TokenRequest token bound to the
pod. It mounts a real JuiceFS volume (FUSE), streams the published model
into its cache, and sets the readiness condition on the real apiserver
through the ValidatingAdmissionPolicy fence.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from devcluster import Cluster, wait_for
from devcluster.juicefs import cached_blocks
from devcluster.kubelet import BANNER, SidecarProcess, apiserver, bound_token, run_sidecar
from devcluster.storage import MIB, StorageStack
from sidecar.manifest import Manifest
from tests.helpers import storage_stack

from .conftest import EXTERNAL_KUBECONFIG

SYSTEM_NAMESPACE = "bento-juicefs-system"
CREDENTIALS = "juicefs-models-credentials"
OPT_IN = {"juicefs.bentoml.com/injection": "enabled"}
SSD = "cloud.google.com/gke-ephemeral-storage-local-ssd"
CONDITION = "juicefs.bentoml.com/models-ready"
BENTO = "sidecar-e2e"
VERSION = "v1"
SHARDS = [96 * MIB] * 4  # plus metadata: ~384 MiB, fits the 1Gi cache the pods ask for


@pytest.fixture(scope="module", autouse=True)
def _local_only() -> None:
    # Before any module fixture: nothing is started or changed on an external cluster.
    if EXTERNAL_KUBECONFIG:
        pytest.skip("the kubelet stand-in needs the local control plane (E2E_KUBECONFIG is set)")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("the sidecar's real FUSE mount needs root and /dev/fuse")


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageStack]:
    with storage_stack(tmp_path_factory.mktemp("e2e-storage")) as stack:
        yield stack


@pytest.fixture(scope="module")
def model(storage: StorageStack, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return storage.publish_random(tmp_path_factory.mktemp("e2e-src"), BENTO, VERSION, SHARDS)


def _secret_data(cluster: Cluster, namespace: str) -> dict[str, str]:
    proc = cluster.kubectl("get", "secret", CREDENTIALS, "-n", namespace, "-o", "json", check=False)
    if proc.returncode != 0:
        return {}
    data = json.loads(proc.stdout).get("data") or {}
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


@pytest.fixture(scope="module")
def namespace(cluster: Cluster, storage: StorageStack) -> Iterator[str]:
    """An opted-in namespace whose copied credentials point at this module's storage."""
    credentials = {
        "metaurl": storage.juicefs.meta_url,
        "access-key": storage.store.access_key,
        "secret-key": storage.store.secret_key,
    }
    # The platform team's source Secret, updated before the namespace opts in.
    original = cluster.get_json("secret", CREDENTIALS, "-n", SYSTEM_NAMESPACE).get("data") or {}
    cluster.kubectl(
        "patch",
        "secret",
        CREDENTIALS,
        "-n",
        SYSTEM_NAMESPACE,
        "--type=merge",
        "-p",
        json.dumps({"stringData": credentials}),
    )
    name = f"e2e-sidecar-{uuid.uuid4().hex[:6]}"
    cluster.create_namespace(name, OPT_IN)
    wait_for(
        lambda: _secret_data(cluster, name) == credentials,
        timeout=60,
        what=f"the namespace controller to copy {CREDENTIALS} into {name}",
    )
    wait_for(
        lambda: (
            cluster.kubectl(
                "auth",
                "can-i",
                "patch",
                "pods",
                "--subresource=status",
                "-n",
                name,
                f"--as=system:serviceaccount:{name}:default",
                check=False,
            ).stdout.strip()
            == "yes"
        ),
        timeout=60,
        what=f"the readiness RBAC in {name}",
    )
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
    restore = [{"op": "replace", "path": "/data", "value": original}]
    cluster.kubectl(
        "patch",
        "secret",
        CREDENTIALS,
        "-n",
        SYSTEM_NAMESPACE,
        "--type=json",
        "-p",
        json.dumps(restore),
        check=False,
    )


@pytest.fixture(scope="module")
def ssd_node(cluster: Cluster) -> Iterator[str]:
    name = f"e2e-sidecar-ssd-{uuid.uuid4().hex[:6]}"
    cluster.register_fake_node(name, {SSD: "true"}, ephemeral_storage="375Gi")
    yield name
    cluster.kubectl("delete", "node", name, "--wait=false", check=False)


def bento_pod(name: str, version: str = VERSION) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                "juicefs.bentoml.com/model-store": "juicefs",
                "yatai.ai/bento-repository": BENTO,
                "yatai.ai/bento-version": version,
            },
            "annotations": {"juicefs.bentoml.com/cache-size": "1Gi"},
        },
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "main", "image": f"us-docker.pkg.dev/acme/bentos/{BENTO}:v1"}],
        },
    }


def get_pod(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    pod: dict[str, Any] = cluster.get_json("pod", name, "-n", namespace)
    return pod


def create_pod(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bento_pod(name)))
    wait_for(
        lambda: get_pod(cluster, namespace, name)["spec"].get("nodeName"),
        timeout=30,
        what=f"pod {name} to be scheduled",
    )
    return get_pod(cluster, namespace, name)


def condition(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    for c in get_pod(cluster, namespace, name).get("status", {}).get("conditions") or []:
        if c["type"] == CONDITION:
            return dict(c)
    return None


def events(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json(
        "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}"
    )["items"]
    return sorted(items, key=lambda e: e.get("firstTimestamp") or "")


def reasons(cluster: Cluster, namespace: str, name: str) -> list[str]:
    return [e["reason"] for e in events(cluster, namespace, name)]


def wait_event(
    cluster: Cluster,
    namespace: str,
    name: str,
    reason: str,
    sidecar: SidecarProcess,
    timeout: float,
) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for e in events(cluster, namespace, name):
            if e["reason"] == reason:
                return e
        assert sidecar.poll() is None or reason in ("MountDied", "Unmounted"), (
            f"the sidecar exited ({sidecar.poll()}) before Event {reason}:\n{sidecar.log_tail()}"
        )
        return None

    return wait_for(found, timeout=timeout, interval=0.5, what=f"Event {reason} on pod {name}")


def wait_condition(
    cluster: Cluster, namespace: str, name: str, sidecar: SidecarProcess, timeout: float
) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        assert sidecar.poll() is None, f"sidecar exited:\n{sidecar.log_tail()}"
        found = condition(cluster, namespace, name)
        return found if found and found["status"] == "True" else None

    return wait_for(ready, timeout=timeout, interval=0.5, what=f"{CONDITION}=True on pod {name}")


class StandIn(Protocol):
    def __call__(
        self, namespace: str, pod: str, extra_env: dict[str, str] | None = None
    ) -> SidecarProcess: ...


@pytest.fixture
def stand_in(cluster: Cluster, tmp_path: Path, storage: StorageStack) -> Iterator[StandIn]:
    started: list[SidecarProcess] = []

    def start(namespace: str, pod: str, extra_env: dict[str, str] | None = None) -> SidecarProcess:
        print(f"{BANNER}: running the injected juicefs-mount sidecar of {namespace}/{pod} locally")
        handle = run_sidecar(
            cluster,
            namespace,
            pod,
            tmp_path / pod,
            juicefs_bin=storage.juicefs.binary,
            extra_env=extra_env,
        )
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.cleanup()
        shutil.rmtree(handle.cache_dir, ignore_errors=True)  # the log stays for post-mortems


def test_sigterm_while_the_mount_hangs_still_exits_cleanly(
    cluster: Cluster,
    namespace: str,
    ssd_node: str,
    stand_in: StandIn,
) -> None:
    """A metadata engine that accepts connections and never answers: the mount hangs.

    SIGTERM must still end the sidecar (exit 0) with nothing mounted, or the
    pod would sit in Terminating.
    """
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(16)
    try:
        url = f"redis://127.0.0.1:{blackhole.getsockname()[1]}/1"
        create_pod(cluster, namespace, "bento-hang")
        sidecar = stand_in(namespace, "bento-hang", {"JFS_META_URL": url})
        wait_for(lambda: "Mounting" in sidecar.log(), timeout=30, what="the mount attempt")
        time.sleep(2)
        assert sidecar.poll() is None, sidecar.log_tail()
        assert sidecar.stop(timeout=30) == 0, sidecar.log_tail()
        assert sidecar.mounts() == []
    finally:
        blackhole.close()


def test_sidecar_opens_the_gate_and_describe_tells_the_story(
    cluster: Cluster,
    namespace: str,
    ssd_node: str,
    model: Manifest,
    stand_in: StandIn,
) -> None:
    pod = create_pod(cluster, namespace, "bento-ready")
    assert any(g["conditionType"] == CONDITION for g in pod["spec"]["readinessGates"])
    assert condition(cluster, namespace, "bento-ready") is None
    sidecar = stand_in(namespace, "bento-ready")
    assert sidecar.env["JFS_META_URL"].startswith("redis://127.0.0.1:")  # from the copied Secret
    assert sidecar.env["POD_UID"] == pod["metadata"]["uid"]
    assert sidecar.env["NODE_NAME"] == pod["spec"]["nodeName"]

    ready = wait_condition(cluster, namespace, "bento-ready", sidecar, timeout=180)
    assert ready["reason"] == "ModelsCached"

    describe = cluster.kubectl("describe", "pod", "bento-ready", "-n", namespace).stdout
    print(describe[describe.index("Events:") :])
    for reason in ("MountReady", "WarmupStarted", "ModelsReady", "Ready"):
        assert re.search(rf"Normal\s+{reason}\s", describe), f"no {reason} Event:\n{describe}"
    models_ready = next(
        e for e in events(cluster, namespace, "bento-ready") if e["reason"] == "ModelsReady"
    )
    match = re.search(
        r"model ready: (\d+) MiB in ([\d.]+)s \(([\d.]+) MB/s\), (\d+) files verified",
        models_ready["message"],
    )
    assert match, models_ready["message"]
    assert int(match.group(1)) == round(model.total_bytes / MIB)
    assert int(match.group(4)) == len(model.files)
    assert re.search(rf"{CONDITION}\s+True", describe), "the readiness gate shows True"

    # What the app container would see: the verified model, cached on the node's disk.
    shard = model.select(())[-1]
    digest = hashlib.sha256((sidecar.mount_point / shard.path).read_bytes()).hexdigest()
    assert digest == shard.sha256
    wait_for(  # JuiceFS writes its cache files asynchronously
        lambda: sum(cached_blocks(sidecar.cache_dir).values()) >= model.total_bytes,
        timeout=30,
        what="the whole model in the sidecar's cache dir",
    )

    assert sidecar.stop() == 0, sidecar.log_tail()
    assert sidecar.mounts() == [], "SIGTERM unmounted everything"
    wait_event(cluster, namespace, "bento-ready", "Unmounted", sidecar, timeout=10)


def test_juicefs_dying_fails_the_sidecar_loudly(
    cluster: Cluster,
    namespace: str,
    ssd_node: str,
    model: Manifest,
    stand_in: StandIn,
) -> None:
    create_pod(cluster, namespace, "bento-mount-dies")
    sidecar = stand_in(namespace, "bento-mount-dies")
    wait_event(cluster, namespace, "bento-mount-dies", "MountReady", sidecar, timeout=60)
    pids = sidecar.juicefs_pids()
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)

    code = sidecar.wait(60)
    assert code == 1, sidecar.log_tail()
    assert "mount.died" in sidecar.log()
    died = wait_event(cluster, namespace, "bento-mount-dies", "MountDied", sidecar, timeout=10)
    assert died["type"] == "Warning"
    assert "the juicefs process exited with code" in died["message"]
    assert "the model mount is gone" in died["message"]
    assert sidecar.mounts() == [], "no dead FUSE mount is left behind"
    found = condition(cluster, namespace, "bento-mount-dies")
    assert found is None or found["status"] != "True"


def test_object_store_outage_holds_the_gate_until_it_is_back(
    cluster: Cluster,
    namespace: str,
    ssd_node: str,
    storage: StorageStack,
    model: Manifest,
    stand_in: StandIn,
) -> None:
    create_pod(cluster, namespace, "bento-outage")
    sidecar = stand_in(namespace, "bento-outage")
    try:

        def streaming() -> bool:
            assert sidecar.poll() is None, sidecar.log_tail()
            return sum(cached_blocks(sidecar.cache_dir).values()) >= model.total_bytes // 10

        wait_for(streaming, timeout=120, interval=0.02, what="10% of the model in the cache")
        storage.store.stop(kill=True)
        stopped = time.monotonic()
        print(f"MinIO killed with {sum(cached_blocks(sidecar.cache_dir).values())} bytes cached")
        stalled = wait_event(cluster, namespace, "bento-outage", "WarmupStalled", sidecar, 60)
        print(f"WarmupStalled after {time.monotonic() - stopped:.1f}s: {stalled['message']}")
        assert stalled["type"] == "Warning"
        assert "object store" in stalled["message"]
        time.sleep(3)
        held = condition(cluster, namespace, "bento-outage")
        assert held is not None
        assert held["status"] == "False", held
        assert "ModelsReady" not in reasons(cluster, namespace, "bento-outage")
    finally:
        storage.store.start()
    ready = wait_condition(cluster, namespace, "bento-outage", sidecar, timeout=120)
    assert ready["reason"] == "ModelsCached"
    seen = reasons(cluster, namespace, "bento-outage")
    assert "WarmupResumed" in seen, seen
    assert seen.index("WarmupStalled") < seen.index("WarmupResumed") < seen.index("ModelsReady")
    assert sidecar.stop() == 0, sidecar.log_tail()
    assert sidecar.mounts() == []


# -- the readiness fence --------------------------------------------------------------


class PodIdentity:
    """kubectl with only a TokenRequest token bound to one pod (no kubeconfig)."""

    def __init__(self, cluster: Cluster, namespace: str, pod: str, work: Path) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.pod = pod
        found = get_pod(cluster, namespace, pod)
        self.token = bound_token(
            cluster, namespace, "default", pod, found["metadata"]["uid"], duration="10m"
        )
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


def _condition_patch(kind: str = CONDITION, status: str = "True") -> dict[str, Any]:
    return {
        "status": {
            "conditions": [
                {"type": kind, "status": status, "reason": "Test", "message": "set by a pod token"}
            ]
        }
    }


def test_the_readiness_fence_lets_a_pod_token_set_only_its_own_condition(
    cluster: Cluster, namespace: str, ssd_node: str, tmp_path: Path
) -> None:
    for name in ("fence-a", "fence-b"):
        create_pod(cluster, namespace, name)
    a = PodIdentity(cluster, namespace, "fence-a", tmp_path)

    whoami = json.loads(a.kubectl("auth", "whoami", "-o", "json").stdout)
    extra = whoami["status"]["userInfo"]["extra"]
    assert extra["authentication.kubernetes.io/pod-name"] == ["fence-a"]

    allowed = a.patch_status("fence-a", _condition_patch())
    assert allowed.returncode == 0, allowed.stderr
    assert (condition(cluster, namespace, "fence-a") or {}).get("status") == "True"

    denials = {
        "another pod's condition": (
            a.patch_status("fence-b", _condition_patch()),
            "a service account token may set pod conditions only for the pod it is bound to "
            "(this token is bound to pod fence-a)",
        ),
        "another condition type": (
            a.patch_status("fence-a", _condition_patch("example.com/other")),
            "a pod's own token may change only the juicefs.bentoml.com/models-ready condition",
        ),
        "the PodScheduled condition": (
            a.patch_status("fence-a", _condition_patch("PodScheduled", "False")),
            "a pod's own token may change only the juicefs.bentoml.com/models-ready condition",
        ),
        "another status field": (
            a.patch_status("fence-a", {"status": {"message": "all good, trust me"}}),
            "a pod's own token may change only the juicefs.bentoml.com/models-ready condition, "
            "no other field",
        ),
        "labels through pods/status": (
            a.patch_status("fence-a", {"metadata": {"labels": {"hijacked": "true"}}}),
            "no other field",
        ),
    }
    for what, (proc, message) in denials.items():
        assert proc.returncode != 0, f"{what} was allowed"
        assert "ValidatingAdmissionPolicy 'bento-juicefs-models-ready-fence'" in proc.stderr, (
            what,
            proc.stderr,
        )
        assert message in proc.stderr, (what, proc.stderr)
        print(f"denied, {what}: {proc.stderr.strip()}")

    # RBAC alone stops the token from editing the pod itself.
    label = a.kubectl("label", "pod", "fence-a", "hijacked=true")
    assert label.returncode != 0
    # RBAC refuses the label change outright (kubectl's GET before its PATCH).
    assert re.search(r'cannot (get|patch) resource "pods"', label.stderr), label.stderr

    b = get_pod(cluster, namespace, "fence-b")
    assert not [c for c in b["status"].get("conditions") or [] if c["type"] == CONDITION]
    a_pod = get_pod(cluster, namespace, "fence-a")
    assert "hijacked" not in a_pod["metadata"].get("labels", {})
    assert "message" not in a_pod["status"]
