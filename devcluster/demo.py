"""`make demo`: the whole path on one machine, ending with `kubectl describe pod`.

A real control plane with the injector registered, a real JuiceFS volume
(MinIO + Redis) holding a published Bento's models, an unchanged Bento
Deployment applied to an opted-in namespace, its pod injected and scheduled
onto a (fake) local-SSD GPU node, and the injected sidecar run by the kubelet
stand-in until the model is streamed, verified and the readiness condition
is True. Everything is stopped at the end unless --keep is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

from devcluster import addons
from devcluster.binaries import ensure_binaries
from devcluster.cluster import wait_for
from devcluster.controlplane import ControlPlane
from devcluster.kubelet import SidecarProcess, run_sidecar
from devcluster.storage import StorageStack, write_random_model
from sidecar.publish import publish

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "bento-deployment.yaml"
NAMESPACE = "bento-demo"
CONDITION = "juicefs.bentoml.com/models-ready"
MIB = 1 << 20


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def bento_identity() -> tuple[str, str]:
    for doc in yaml.safe_load_all(EXAMPLE.read_text()):
        if doc and doc.get("kind") == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            return labels["yatai.ai/bento-repository"], labels["yatai.ai/bento-version"]
    raise SystemExit(f"{EXAMPLE} has no Deployment")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.demo", description=__doc__)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument(
        "--shard-mib", type=int, default=128, help="size of each of 3 weight shards"
    )
    parser.add_argument("--keep", action="store_true", help="leave everything running at the end")
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bento-juicefs-demo-"))
    started = time.monotonic()

    step("binaries: etcd, kube-apiserver, controller-manager, scheduler, kubectl, MinIO, JuiceFS")
    binaries = ensure_binaries(
        [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubectl",
            "minio",
            "juicefs",
        ]
    )
    step("control plane + injector (webhook, admission policies and RBAC from manifests/base)")
    cp = ControlPlane(
        work / "cluster", binaries=binaries, on_ready=addons.ON_READY, on_stop=addons.ON_STOP
    )
    cp.start()
    storage = StorageStack(work / "storage")
    sidecar: SidecarProcess | None = None
    try:
        step(
            "JuiceFS volume: MinIO (objects) + Redis (metadata), formatted and mounted for writing"
        )
        storage.start()
        name, version = bento_identity()
        models = write_random_model(work / "bento", [args.shard_mib * MIB] * 3, model="llama3")
        manifest = publish(models, storage.writer_mount, "/bentos/{name}/{version}", name, version)
        print(
            f"published {manifest.bento}: {len(manifest.files)} files, "
            f"{manifest.total_bytes / MIB:.0f} MiB (sidecar publish layout)"
        )

        step("platform team: JuiceFS credentials for the injector to hand out, and a GPU node pool")
        credentials = {
            "metaurl": storage.juicefs.meta_url,
            "access-key": storage.store.access_key,
            "secret-key": storage.store.secret_key,
        }
        cp.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": "juicefs-models-credentials",
                    "namespace": "bento-juicefs-system",
                },
                "stringData": credentials,
            }
        )
        cp.register_fake_node(
            "gke-l4-ssd-pool-1",
            {
                "cloud.google.com/gke-accelerator": "nvidia-l4",
                "cloud.google.com/gke-ephemeral-storage-local-ssd": "true",
                "cloud.google.com/gke-image-streaming": "true",
            },
            cpu="16",
            memory="64Gi",
            ephemeral_storage="375Gi",
            extra_resources={"nvidia.com/gpu": "1"},
        )
        cp.register_fake_node(
            "gke-l4-pd-pool-1",
            {"cloud.google.com/gke-accelerator": "nvidia-l4"},
            cpu="16",
            memory="64Gi",
            ephemeral_storage="100Gi",
            extra_resources={"nvidia.com/gpu": "1"},
        )

        step(f"user: opt namespace {NAMESPACE} in, apply the unchanged Bento Deployment")
        cp.create_namespace(NAMESPACE, {"juicefs.bentoml.com/injection": "enabled"})
        wait_for(
            lambda: (
                cp.kubectl(
                    "get", "secret", "juicefs-models-credentials", "-n", NAMESPACE, check=False
                ).returncode
                == 0
            ),
            timeout=30,
            what="credentials copied by the namespace controller",
        )
        cp.kubectl("apply", "-f", str(EXAMPLE))
        cp.kubectl("scale", "deployment", "-n", NAMESPACE, "--all", "--replicas=1")

        def bound_pod() -> str | None:
            for pod in cp.get_json("pods", "-n", NAMESPACE)["items"]:
                if pod["spec"].get("nodeName") and not pod["metadata"].get("deletionTimestamp"):
                    return str(pod["metadata"]["name"])
            return None

        pod = wait_for(bound_pod, timeout=60, what="the Bento pod to be scheduled")
        node = cp.get_json("pod", pod, "-n", NAMESPACE)["spec"]["nodeName"]
        print(f"pod {pod} injected and bound to {node} (the local-SSD node)")

        step("kubelet stand-in: run the injected juicefs-mount sidecar (there is no kubelet here)")
        sidecar = run_sidecar(cp, NAMESPACE, pod, work / "kubelet")

        def ready() -> bool:
            if sidecar is not None and sidecar.poll() is not None:
                raise SystemExit(f"the sidecar exited:\n{sidecar.log_tail()}")
            conditions = cp.get_json("pod", pod, "-n", NAMESPACE)["status"].get("conditions") or []
            return any(c["type"] == CONDITION and c["status"] == "True" for c in conditions)

        wait_for(ready, timeout=600, interval=1, what=f"condition {CONDITION}=True")

        step(f"kubectl describe pod {pod} -n {NAMESPACE}")
        print(cp.kubectl("describe", "pod", pod, "-n", NAMESPACE).stdout)
        status = cp.get_json("pod", pod, "-n", NAMESPACE)["metadata"]["annotations"]
        print("juicefs.bentoml.com/status (in full):")
        print(json.dumps(json.loads(status["juicefs.bentoml.com/status"]), indent=2))
        print(f"\ndemo finished in {time.monotonic() - started:.0f}s")
        if args.keep:
            print(f"left running: export KUBECONFIG={cp.kubeconfig}  (work dir {work})")
            return 0
    finally:
        if not args.keep:
            step("clean up: SIGTERM the sidecar (it unmounts), stop storage and the control plane")
            if sidecar is not None:
                code = sidecar.stop()
                print(f"sidecar exited with {code}")
                sidecar.cleanup()
            storage.stop()
            cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
