"""`make demo`: the whole path on one machine, ending with `kubectl describe pod`.

A real control plane and a real node (containerd + kubelet, shaped like a
GKE local-SSD L4 node), the injector installed by Helm as pods on the node, a real
JuiceFS volume (MinIO + Redis) into which a Bento's models are published,
and then, as a user would: the namespace label and `kubectl apply` of the
unchanged examples/bento-deployment.yaml, in a namespace that enforces Pod
Security `baseline`. The node agent (the DaemonSet) runs on the node: the
injected `juicefs-mount` sidecar holds no privilege, the agent mounts for
it, warms and verifies
the model into the node cache once, and opens the gate from that seal.
The kubelet runs the sidecar and the sample Bento (BentoML); the app
answers from the bytes it loaded. Everything is stopped at the end unless
--keep is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from devcluster.cluster import Cluster, wait_for
from devcluster.local import local_cluster
from devcluster.storage.stack import MIB, StorageStack

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "bento-deployment.yaml"
NAMESPACE = "bento-demo"
CONDITION = "juicefs.bentoml.com/models-ready"


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def bento_identity() -> tuple[str, str, str]:
    """(deployment name, bento name, bento version) of the example."""
    for doc in yaml.safe_load_all(EXAMPLE.read_text()):
        if doc and doc.get("kind") == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            repository, version = (
                labels["yatai.ai/bento-repository"],
                labels["yatai.ai/bento-version"],
            )
            return str(doc["metadata"]["name"]), repository, version
    raise SystemExit(f"{EXAMPLE} has no Deployment")


def milestones(pod: dict[str, Any]) -> list[str]:
    """What has happened to the pod so far, in the order a user cares about."""
    status = pod.get("status", {})
    conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
    seen = []
    if pod["spec"].get("nodeName"):
        seen.append(f"scheduled on {pod['spec']['nodeName']}")
    for group in ("initContainerStatuses", "containerStatuses"):
        for c in status.get(group) or []:
            if "running" in c.get("state", {}):
                seen.append(f"{c['name']} running")
            if c.get("ready"):
                seen.append(f"{c['name']} ready")
    if conditions.get(CONDITION) == "True":
        seen.append(f"{CONDITION}=True")
    if conditions.get("Ready") == "True":
        seen.append("pod Ready")
    return seen


def apply_example(cp: Cluster, deployment: str) -> float:
    """As a user: label the namespace, apply the unchanged example; when it was applied."""
    step(
        f"user: label namespace {NAMESPACE} (it enforces Pod Security baseline), "
        f"apply the unchanged {EXAMPLE.relative_to(REPO)}"
    )
    cp.create_namespace(
        NAMESPACE,
        {
            "juicefs.bentoml.com/injection": "enabled",
            "pod-security.kubernetes.io/enforce": "baseline",
        },
    )
    cp.wait_provisioned(NAMESPACE)
    applied = time.monotonic()
    cp.kubectl("apply", "-f", str(EXAMPLE))
    # The node has one GPU: one replica (the example asks for two).
    cp.kubectl("scale", "deployment", deployment, "-n", NAMESPACE, "--replicas=1")
    return applied


def wait_ready(cp: Cluster, applied: float) -> dict[str, Any]:
    """The Bento pod once Ready, printing each milestone as it is first seen."""
    shown: list[str] = []

    def ready() -> dict[str, Any] | None:
        pods = cp.get_json("pods", "-n", NAMESPACE)["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        if len(live) != 1:
            return None
        for event in milestones(live[0]):
            if event not in shown:
                shown.append(event)
                print(f"  +{time.monotonic() - applied:5.1f}s  {event}", flush=True)
        return live[0] if "pod Ready" in shown else None

    return wait_for(ready, timeout=600, interval=0.3, what="the Bento pod to be Ready")


def answers_with(pod: dict[str, Any], published: dict[str, str]) -> bool:
    """Whether the app's answer lists exactly the published files (path: sha256)."""
    url = f"http://{pod['status']['podIP']}:3000/predict"
    step(f"the app answers from the bytes it loaded: POST {url}")
    request = urllib.request.Request(
        url,
        data=json.dumps({"text": "hello"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    same = bool(answer["files"] == published)
    print(
        f"{len(answer['files'])} files, {answer['total_bytes'] / MIB:.0f} MiB loaded; "
        f"sha256 of every file equal to the published manifest: {same}"
    )
    return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.demo", description=__doc__)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--shard-mib", type=int, default=128, help="size of each of 3 shards")
    parser.add_argument("--keep", action="store_true", help="leave everything running at the end")
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bento-juicefs-demo-"))
    started = time.monotonic()

    step(
        "the local cluster: control plane, a real node (containerd + kubelet) with the project's "
        "images, MinIO + Redis + JuiceFS, the injector installed by Helm (two pods on the node)"
    )
    cp = local_cluster(work / "cluster", die_with_parent=not args.keep)
    cp.start()
    try:
        storage = cp.addons["storage"]
        assert isinstance(storage, StorageStack)
        print(cp.kubectl("get", "nodes", "-o", "wide").stdout)

        step(
            "the platform team: the node agent (a DaemonSet, the only privileged part) on the "
            "node, beside the injector"
        )
        print(
            cp.kubectl(
                "get", "pods", "-n", "bento-juicefs-system", "-o", "wide", check=False
            ).stdout
        )

        step("the Bento's build pipeline: publish its models into JuiceFS (sidecar publish layout)")
        deployment, name, version = bento_identity()
        manifest = storage.publish_random(work, name, version, [args.shard_mib * MIB] * 3)
        print(
            f"published {manifest.bento}: {len(manifest.files)} files, "
            f"{manifest.total_bytes / MIB:.0f} MiB"
        )

        pod = wait_ready(cp, apply_example(cp, deployment))
        name = pod["metadata"]["name"]
        step(f"kubectl describe pod {name} -n {NAMESPACE}")
        print(cp.kubectl("describe", "pod", name, "-n", NAMESPACE).stdout)

        same = answers_with(pod, {f.path: f.sha256 for f in manifest.files})
        print(f"\ndemo finished in {time.monotonic() - started:.0f}s")
        if not same:
            return 1
        if args.keep:
            print(f"left running: export KUBECONFIG={cp.kubeconfig}  (work dir {work})")
            print(f"stop it with: python -m devcluster down --state-dir {cp.state_dir}")
            return 0
    finally:
        if not args.keep:
            step("clean up: the node (pods, mounts, namespaces), storage and the control plane")
            cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
