"""Injected pods of every shape, run for real on the local node.

Each pod's app (or init) container proves what it read: it compares the
sha256 of a published shard, read through the propagated JuiceFS mount,
with the manifest's and exits non-zero on a mismatch; so a pod that turns
Ready (or a Job that completes) has read the verified bytes.
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster import Cluster, wait_for
from devcluster.images import SAMPLE_BENTO_IMAGE
from devcluster.node.node import Node
from devcluster.storage.juicefs import cached_blocks
from devcluster.storage.stack import MIB, StorageStack
from injector.config import InjectorConfig
from modelstore.manifest import Manifest
from tests.e2e.pods import (
    GATE,
    SIDECAR,
    PodIdentity,
    bento_labels,
    check_command,
    checking_container,
    condition,
    diagnose,
    get_pod,
    is_ready,
    pod_cache_dir,
    pod_manifest,
    reasons,
    wait_event,
    wait_log,
    wait_pod,
)

CREDENTIALS = "juicefs-models-credentials"
BENTO, VERSION = "pods-on-node", "v1"
OUTAGE_BENTO = "outage-on-node"


@pytest.fixture(scope="module")
def small_model(storage: StorageStack, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return storage.publish_random(tmp_path_factory.mktemp("small"), BENTO, VERSION, [8 * MIB] * 2)


NewNamespace = Callable[..., str]


@pytest.fixture
def new_namespace(cluster: Cluster) -> Iterator[NewNamespace]:
    created: list[str] = []

    def make(secret: dict[str, str] | None = None) -> str:
        """An opted-in namespace; with `secret`, the tenant's own credentials Secret first."""
        name = f"e2e-node-{uuid.uuid4().hex[:6]}"
        cluster.create_namespace(name)
        created.append(name)
        if secret is not None:
            cluster.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": CREDENTIALS, "namespace": name},
                    "stringData": secret,
                }
            )
        cluster.kubectl("label", "namespace", name, "juicefs.bentoml.com/injection=enabled")
        cluster.wait_provisioned(name)
        return name

    yield make
    for name in created:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def run_pod(cluster: Cluster, namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    name = pod["metadata"]["name"]
    return wait_pod(cluster, namespace, name, is_ready, timeout=180, what=f"pod {name} Ready")


HARDENED = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def shapes(model: Manifest) -> dict[str, dict[str, Any]]:
    """Pod specs users run, each of which must still get the verified model."""
    shard = max(model.files, key=lambda f: f.size)
    return {
        "no-token": {
            "automountServiceAccountToken": False,
            "containers": [checking_container(model)],
        },
        "hardened": {
            "securityContext": {"runAsNonRoot": True, "fsGroup": 1000},
            "containers": [checking_container(model, securityContext=HARDENED)],
        },
        "init-reads-model": {
            "initContainers": [
                {
                    "name": "check-model",
                    "image": SAMPLE_BENTO_IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "command": check_command(shard.path, shard.sha256, then="exit 0"),
                }
            ],
            "containers": [checking_container(model)],
        },
        "host-network": {
            "hostNetwork": True,
            "dnsPolicy": "ClusterFirstWithHostNet",
            "containers": [checking_container(model)],
        },
    }


@pytest.mark.parametrize("shape", ["no-token", "hardened", "init-reads-model", "host-network"])
def test_unusual_pods_run_and_read_the_verified_model(
    cluster: Cluster, node: Node, new_namespace: NewNamespace, small_model: Manifest, shape: str
) -> None:
    namespace = new_namespace()
    spec = shapes(small_model)[shape]
    pod = run_pod(cluster, namespace, pod_manifest(shape, bento_labels(BENTO, VERSION), spec))
    gate = condition(pod, GATE)
    assert gate is not None, diagnose(cluster, namespace, shape)
    assert gate["status"] == "True"
    # Verified by the sidecar (pod cache), or sealed by the agent (node cache, the default).
    assert gate["reason"] in ("ModelsCached", "ModelsSealed"), gate
    injected = pod["spec"]["initContainers"][0]
    assert injected["name"] == SIDECAR
    if shape == "init-reads-model":
        assert [c["name"] for c in pod["spec"]["initContainers"]] == [SIDECAR, "check-model"]
        wait_log(cluster, namespace, shape, "check-model", "verified")
    # The app's own sha256 check through the mount (it prints after it is Ready).
    wait_log(cluster, namespace, shape, "main", "verified")


def test_a_job_runs_to_completion_and_the_sidecar_does_not_keep_it_alive(
    cluster: Cluster, node: Node, new_namespace: NewNamespace, small_model: Manifest
) -> None:
    namespace = new_namespace()
    shard = max(small_model.files, key=lambda f: f.size)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "score"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": bento_labels(BENTO, VERSION)},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": SAMPLE_BENTO_IMAGE,
                            "imagePullPolicy": "IfNotPresent",
                            "command": check_command(shard.path, shard.sha256, then="exit 0"),
                        }
                    ],
                },
            },
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))
    cluster.kubectl(
        "wait", "--for=condition=Complete", "job/score", "-n", namespace, "--timeout=180s",
        timeout=200,
    )  # fmt: skip
    pods = cluster.get_json("pods", "-n", namespace, "-l", "job-name=score")["items"]
    assert len(pods) == 1
    assert pods[0]["status"]["phase"] == "Succeeded"
    sidecar = next(s for s in pods[0]["status"]["initContainerStatuses"] if s["name"] == SIDECAR)
    assert "terminated" in sidecar["state"], sidecar


def _juicefs_mounts(node: Node, uid: str) -> list[Path]:
    return [m for m in node.mounts("fuse.juicefs") if uid in str(m)]


def test_deleting_a_pod_whose_mount_hangs_still_ends_within_the_grace_period(
    cluster: Cluster, node: Node, new_namespace: NewNamespace, small_model: Manifest
) -> None:
    """A metadata engine that accepts connections and never answers: the mount hangs.

    The tenant's own credentials Secret (left alone by the namespace
    controller) points there. Deleting the pod SIGTERMs the sidecar, which
    must exit at once, or the pod would sit in Terminating.
    """
    assert node.network is not None
    blackhole = socket.socket()
    blackhole.bind((node.network.host_ip, 0))
    blackhole.listen(16)
    try:
        url = f"redis://{node.network.host_ip}:{blackhole.getsockname()[1]}/1"
        namespace = new_namespace(secret={"metaurl": url})
        # Its own cache: on the node cache a Bento the node holds is shown from the
        # agent's copy, and the pod's own metadata engine is never asked.
        pod = pod_manifest(
            "hang", bento_labels(BENTO, VERSION), {"containers": [checking_container(small_model)]},
            **{"juicefs.bentoml.com/cache-mode": "pod"},
        )  # fmt: skip
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
        wait_event(cluster, namespace, "hang", "Started", timeout=60)
        time.sleep(3)
        found = get_pod(cluster, namespace, "hang")
        uid = found["metadata"]["uid"]
        assert not is_ready(found)
        started = time.monotonic()
        cluster.kubectl("delete", "pod", "hang", "-n", namespace, "--wait=false")
        try:
            wait_for(
                lambda: (
                    cluster.kubectl("get", "pod", "hang", "-n", namespace, check=False).returncode
                    != 0
                ),
                timeout=60,
                interval=0.2,
                what="the pod gone",
            )
        except TimeoutError as err:
            raise AssertionError(f"{err}\n{diagnose(cluster, namespace, 'hang')}") from None
        seconds = time.monotonic() - started
        print(f"pod with a hanging mount deleted in {seconds:.1f}s (grace 20s)")
        assert seconds < 20
    finally:
        blackhole.close()
    wait_for(lambda: not _juicefs_mounts(node, uid), timeout=30, what="no JuiceFS mount left")


def _cache_dir(node: Node, pod: dict[str, Any]) -> Path:
    return pod_cache_dir(node.dir, str(pod["metadata"]["uid"]))


def test_an_object_store_outage_holds_the_gate_until_it_is_back(
    cluster: Cluster,
    node: Node,
    new_namespace: NewNamespace,
    storage: StorageStack,
    tmp_path: Path,
) -> None:
    model = storage.publish_random(tmp_path, OUTAGE_BENTO, VERSION, [64 * MIB] * 4)
    namespace = new_namespace()
    shard = max(model.files, key=lambda f: f.size)
    spec = {
        "containers": [
            {
                "name": "main",
                "image": SAMPLE_BENTO_IMAGE,
                "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", "exec sleep 3600"],
            }
        ]
    }
    # The pod cache: the test watches the model arrive in this pod's own emptyDir.
    manifest = pod_manifest(
        "outage", bento_labels(OUTAGE_BENTO, VERSION), spec,
        **{"juicefs.bentoml.com/cache-mode": "pod"},
    )  # fmt: skip
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    pod = wait_pod(
        cluster, namespace, "outage", lambda p: bool(p["metadata"].get("uid")) and bool(
            p.get("status", {}).get("initContainerStatuses")
        ), timeout=60, what="the sidecar to start",
    )  # fmt: skip
    cache = _cache_dir(node, pod)
    try:
        wait_for(
            lambda: sum(cached_blocks(cache).values()) >= model.total_bytes // 10,
            timeout=120,
            interval=0.02,
            what="10% of the model in the cache",
        )
        storage.store.stop(kill=True)
        stopped = time.monotonic()
        stalled = wait_event(cluster, namespace, "outage", "WarmupStalled", timeout=90)
        print(f"WarmupStalled after {time.monotonic() - stopped:.1f}s: {stalled['message']}")
        assert stalled["type"] == "Warning"
        assert "object store" in stalled["message"]
        time.sleep(3)
        held = get_pod(cluster, namespace, "outage")
        assert not is_ready(held)
        assert (condition(held, GATE) or {}).get("status") != "True"
        assert "ModelsReady" not in reasons(cluster, namespace, "outage")
    finally:
        storage.store.start()
    pod = wait_pod(cluster, namespace, "outage", is_ready, timeout=180, what="Ready after")
    seen = reasons(cluster, namespace, "outage")
    assert "WarmupResumed" in seen, seen
    assert seen.index("WarmupStalled") < seen.index("WarmupResumed") < seen.index("ModelsReady")
    assert shard.sha256  # the gate opened only after every file, this one too, was verified


# -- the readiness fence --------------------------------------------------------------


def _condition_patch(kind: str = GATE, status: str = "True") -> dict[str, Any]:
    return {
        "status": {
            "conditions": [
                {"type": kind, "status": status, "reason": "Test", "message": "set by a pod token"}
            ]
        }
    }


def _grant_pod_status(cluster: Cluster, namespace: str) -> None:
    """What a tenant with the namespace's admin role may do: give its own service account
    the right to patch its pods' status (the injector grants nothing of the kind)."""
    rules = [{"apiGroups": [""], "resources": ["pods/status"], "verbs": ["get", "patch"]}]
    cluster.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "tenant-pod-status", "namespace": namespace},
            "rules": rules,
        }
    )
    cluster.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "tenant-pod-status", "namespace": namespace},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "tenant-pod-status",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}],
        }
    )


def test_no_token_of_the_namespace_sets_the_models_ready_condition(
    cluster: Cluster, new_namespace: NewNamespace, tmp_path: Path
) -> None:
    """A token bound to the pod itself: RBAC refuses it (the injector grants the namespace
    nothing), and when the tenant grants itself pods/status, the models-ready fence still
    refuses any change of the condition. Other conditions stay the tenant's business."""
    namespace = new_namespace()
    # Never scheduled (no such node): nothing but this test touches its status.
    pod = pod_manifest(
        "fence",
        bento_labels(BENTO, VERSION),
        {"containers": [{"name": "main", "image": SAMPLE_BENTO_IMAGE}]},
    )
    pod["spec"]["nodeSelector"] = {"e2e.bento-juicefs/nowhere": "true"}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    own = PodIdentity(cluster, namespace, "fence", tmp_path)
    whoami = json.loads(own.kubectl("auth", "whoami", "-o", "json").stdout)
    assert whoami["status"]["userInfo"]["extra"]["authentication.kubernetes.io/pod-name"] == [
        "fence"
    ]

    unbound = own.patch_status("fence", _condition_patch())
    assert unbound.returncode != 0, "the namespace's token patched pods/status without a grant"
    assert re.search(r'cannot (get|patch) resource "pods/status"', unbound.stderr), unbound.stderr
    print(f"denied by RBAC: {unbound.stderr.strip()}")

    _grant_pod_status(cluster, namespace)
    # RBAC caches its view for a moment: wait until another condition goes through.
    other = wait_for(
        lambda: own.patch_status("fence", _condition_patch("example.com/other")).returncode == 0,
        timeout=30,
        what="the tenant's own grant to take effect",
    )
    assert other
    message = (
        "pod fence: only the node agent sets its juicefs.bentoml.com/models-ready condition; "
        "no other identity may change it"
    )
    for status in ("True", "False"):
        denied = own.patch_status("fence", _condition_patch(status=status))
        assert denied.returncode != 0, f"{status} was allowed"
        assert "ValidatingAdmissionPolicy 'bento-juicefs-models-ready-fence'" in denied.stderr
        assert message in " ".join(denied.stderr.split()), denied.stderr
        print(f"denied by the fence, {status}: {denied.stderr.strip()}")
    assert condition(get_pod(cluster, namespace, "fence"), GATE) is None

    # Opted out, the fence holds: it is keyed on the identity, not the label.
    opt_in = InjectorConfig().labels.namespace_opt_in
    cluster.kubectl("label", "namespace", namespace, f"{opt_in}-")
    after = own.patch_status("fence", _condition_patch())
    assert after.returncode != 0, "the tenant set the condition once its namespace opted out"
    assert message in " ".join(after.stderr.split()), after.stderr
    assert condition(get_pod(cluster, namespace, "fence"), GATE) is None
