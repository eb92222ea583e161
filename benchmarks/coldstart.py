"""Cold start and warm start on the real node, against the shaped store's own bandwidth.

One local cluster (`devcluster.local.local_cluster`: control plane, the real
node, the injector) whose storage is MinIO behind a shaped link
(`benchmarks.store`): the node's pods reach the store over a veth straight
between the node's and the store's network namespaces, shaped like the
host's. The example Bento's models (default 2 GiB in 4 shards) are published
into JuiceFS, and the same files as plain objects for the baseline. Then:

- raw: parallel GETs of the model's block objects over the shaped link: the
  limit is 1.15 x model bytes / that rate + 5 s;
- cold start (ours): `kubectl apply` of examples/bento-deployment.yaml
  (one replica: the node has one GPU) in an opted-in namespace, to pod Ready
  (the sidecar verified every byte; the app's own readiness probe passed);
- baseline (what users do today): the same Deployment, not injected, with an
  init container that downloads the whole model with 16 parallel ranged GETs
  (`benchmarks/fetch_model.py`, in the Bento's own image) into an emptyDir
  before the app starts; apply to Ready;
- warm start: the Deployment deleted and applied again on the same node, so
  the sidecar finds the blocks in the node cache (cache mode `node`, issue 7);
  the fraction of bytes from the node cache is what its ModelsReady Event says.

Both scenarios share one cluster when run in one `make bench`; each first
measures a cold start on a node whose cache is empty.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.record import MIB, REPO, new_record, say
from benchmarks.store import ShapedStorage
from devcluster.control.plane import ControlPlane
from devcluster.images import SAMPLE_BENTO_IMAGE
from devcluster.installs.injector_pods import start_injector, stop_injector
from devcluster.installs.node_agent import start_node_agent, stop_node_agent
from devcluster.local import local_cluster
from devcluster.storage.minio_metrics import store_requests
from devcluster.storage.s3 import read_objects
from devcluster.storage.shaped_link import LinkProfile
from devcluster.storage.stack import PATH_TEMPLATE, write_random_model
from modelstore.manifest import Manifest
from modelstore.publish import publish

EXAMPLE = REPO / "examples" / "bento-deployment.yaml"
FETCH_SCRIPT = Path(__file__).resolve().parent / "fetch_model.py"
OURS_NAMESPACE = "bento-demo"  # the example's own namespace, opted in
BASELINE_NAMESPACE = "bento-baseline"  # not opted in: nothing is injected
CONDITION = "juicefs.bentoml.com/models-ready"
PLAIN_PREFIX = "plain"
MODELS_PATH = "/home/bentoml/bento/models"
_READY_MESSAGE = re.compile(r"from the (?P<mode>\w+) cache")
# The sample app's own line (examples/bento-app/service.py) once it has read
# and hashed every model file.
_APP_LOADED = re.compile(r"loaded \d+ model file\(s\), \d+ bytes, from \S+ in (?P<s>[\d.]+) s")
# A pod in node cache mode whose gate the node agent opened from its seal.
_SEALED = "sealed by the node agent"


def example_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def deployment_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Deployment")


@dataclass
class StartResult:
    """One apply-to-Ready, with when each milestone was first seen (seconds after apply)."""

    seconds: float
    milestones: dict[str, float]
    pod: str
    events: list[dict[str, str]] = field(default_factory=list)
    app_log: list[str] = field(default_factory=list)  # what the app says about its load
    # What the object store served from apply to Ready: a byte fetched twice shows here.
    store_mib: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 2),
            "milestones": {k: round(v, 2) for k, v in self.milestones.items()},
            "pod": self.pod,
            "events": self.events,
            "app_log": self.app_log,
            "store_mib": self.store_mib,
        }


def _milestones(pod: dict[str, Any]) -> list[str]:
    status = pod.get("status", {})
    seen = []
    if pod["spec"].get("nodeName"):
        seen.append("scheduled")
    for group in ("initContainerStatuses", "containerStatuses"):
        for c in status.get(group) or []:
            if "running" in c.get("state", {}):
                seen.append(f"{c['name']} running")
            if c.get("started") and group == "initContainerStatuses":
                seen.append(f"{c['name']} started")
            if "terminated" in c.get("state", {}):
                seen.append(f"{c['name']} finished")
            if c.get("ready"):
                seen.append(f"{c['name']} ready")
    for c in status.get("conditions") or []:
        if c["status"] == "True" and c["type"] in (CONDITION, "Ready"):
            seen.append(f"{c['type']}=True")
    return seen


class Session:
    """The cluster, the shaped store and the published model, shared by both scenarios."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.profile: LinkProfile = args.cold_profile
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-coldstart-", dir=args.work_dir))
        self.cp: ControlPlane = local_cluster(self.tmp / "cluster", with_addons=False)
        self.shaped: ShapedStorage | None = None
        self.manifest: Manifest | None = None
        self.keys: list[str] = []
        self.raw: dict[str, Any] = {}
        self.results: dict[str, StartResult] = {}
        self.versions: dict[str, str] = {}
        self.opted_in = False

    # -- the cluster and its storage ----------------------------------------

    def _start_storage(self, cp: ControlPlane) -> None:
        assert cp.network is not None
        shaped = ShapedStorage(cp.state_dir / "storage", redis_host=cp.host, node=cp.network)
        self.shaped = shaped
        cp.addons["storage"] = shaped.stack  # the injector's credentials Secret reads it
        shaped.start()

    def _stop_storage(self, cp: ControlPlane) -> None:
        if self.shaped is not None:
            self.shaped.stop()

    def start(self) -> None:
        # The node agent mounts for every sidecar: without it no pod starts.
        self.cp.on_ready.extend([self._start_storage, start_injector, start_node_agent])
        self.cp.on_stop.extend([self._stop_storage, stop_injector, stop_node_agent])
        say("cold-start", f"starting the local cluster in {self.tmp}")
        self.cp.start()
        assert self.shaped is not None
        stack = self.shaped.stack
        self.versions = {
            "juicefs": stack.juicefs.run("version").strip(),
            "kubernetes": json.loads(self.cp.kubectl("version", "-o", "json").stdout)[
                "serverVersion"
            ]["gitVersion"],
        }
        _, name, version = self.identity()
        shards = [self.args.cold_size_mib * MIB // 4] * 4
        source = write_random_model(self.tmp / "src", shards)
        try:
            self.manifest = publish(source, stack.writer_mount, PATH_TEMPLATE, name, version)
            self._upload_plain(source, name, version)
        finally:
            shutil.rmtree(self.tmp / "src", ignore_errors=True)
        self.keys = stack.block_keys(self.manifest, name, version)
        store = self.shaped.store
        plain = [self.plain_key(name, version, f.path) for f in self.manifest.files]
        read_objects(store.s3, store.bucket, [*self.keys, *plain], 16)  # into MinIO's page cache
        self.shaped.shape(self.profile)
        result = read_objects(store.s3, store.bucket, self.keys, 16)
        self.raw = {
            "mib_per_s": round(result.mb_per_s, 1),
            "bytes": result.bytes,
            "seconds": round(result.seconds, 2),
            "connections": 16,
            "path": "host link (the node link has the same qdisc)",
        }
        say(
            "cold-start",
            f"published {self.manifest.total_bytes / MIB:.0f} MiB ({len(self.keys)} blocks); "
            f"raw {result.mb_per_s:.0f} MiB/s under {self.profile.name}",
        )

    def plain_key(self, name: str, version: str, path: str) -> str:
        return f"{PLAIN_PREFIX}/{name}/{version}/models/{path}"

    def _upload_plain(self, source: Path, name: str, version: str) -> None:
        """The same files as plain objects, readable without keys (the baseline's copy)."""
        assert self.shaped is not None
        assert self.manifest is not None
        store = self.shaped.store
        for entry in self.manifest.files:
            data = (source / entry.path).read_bytes()
            store.s3.put_object(store.bucket, self.plain_key(name, version, entry.path), data)
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": ["*"]},
                    "Action": ["s3:GetObject"],
                    "Resource": [f"arn:aws:s3:::{store.bucket}/{PLAIN_PREFIX}/*"],
                }
            ],
        }
        status, body = store.s3.request(
            "PUT", f"/{store.bucket}", {"policy": ""}, json.dumps(policy).encode()
        )
        if status not in (200, 204):
            raise RuntimeError(f"bucket policy: HTTP {status}: {body[:300]!r}")

    def stop(self) -> None:
        try:
            self.cp.stop()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def identity(self) -> tuple[str, str, str]:
        """(deployment, bento repository, bento version) of the example."""
        deployment = deployment_of(example_docs())
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        return (
            deployment["metadata"]["name"],
            labels["yatai.ai/bento-repository"],
            labels["yatai.ai/bento-version"],
        )

    # -- one start -----------------------------------------------------------

    def apply_and_wait(self, namespace: str, docs: list[dict[str, Any]], what: str) -> StartResult:
        cp = self.cp
        deployment = deployment_of(docs)
        name = deployment["metadata"]["name"]
        text = yaml.safe_dump_all(docs)
        assert self.shaped is not None
        served_before = store_requests(self.shaped.store)
        applied = time.monotonic()
        cp.kubectl("apply", "-f", "-", input=text)
        seen: dict[str, float] = {}
        deadline = applied + 900
        pod: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            pods = cp.get_json("pods", "-n", namespace)["items"]
            live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
            if live:
                pod = live[0]
                for event in _milestones(pod):
                    if event not in seen:
                        seen[event] = time.monotonic() - applied
                if "Ready=True" in seen:
                    break
            time.sleep(0.2)
        if pod is None or "Ready=True" not in seen:
            raise RuntimeError(f"{what}: no pod Ready within 900 s; seen {seen}")
        pod_name = pod["metadata"]["name"]
        result = StartResult(seen["Ready=True"], seen, pod_name)
        served = store_requests(self.shaped.store) - served_before
        result.store_mib = round(served.bytes_sent / MIB, 1)
        result.events = [
            {"reason": e.get("reason", ""), "message": e.get("message", "")}
            for e in cp.get_json(
                "events", "-n", namespace, "--field-selector", f"involvedObject.name={pod_name}"
            )["items"]
        ]
        logs = cp.kubectl("logs", pod_name, "-n", namespace, "-c", "main", check=False).stdout
        result.app_log = [line for line in logs.splitlines() if "loaded" in line][-3:]
        say(
            "cold-start",
            f"{what}: Ready {result.seconds:.1f}s after apply, the store serving "
            f"{result.store_mib} MiB ({seen})",
        )
        say("cold-start", f"{what}: the app says {result.app_log}")
        cp.kubectl("delete", "deployment", name, "-n", namespace, "--wait=true", timeout=180)
        self._wait_gone(namespace)
        return result

    def _wait_gone(self, namespace: str) -> None:
        deadline = time.monotonic() + 180
        while self.cp.get_json("pods", "-n", namespace)["items"]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pods in {namespace} did not go away")
            time.sleep(0.5)

    def ours_docs(self) -> list[dict[str, Any]]:
        docs = example_docs()
        deployment_of(docs)["spec"]["replicas"] = 1  # one GPU on the node
        return docs

    def ours(self, key: str, what: str) -> StartResult:
        if key not in self.results:
            if not self.opted_in:
                self.cp.create_namespace(
                    OURS_NAMESPACE, {"juicefs.bentoml.com/injection": "enabled"}
                )
                self.cp.wait_provisioned(OURS_NAMESPACE)
                self.opted_in = True
            self.results[key] = self.apply_and_wait(OURS_NAMESPACE, self.ours_docs(), what)
        return self.results[key]

    def cold(self) -> StartResult:
        return self.ours("cold", "cold start (injected, empty node cache)")

    def warm(self) -> StartResult:
        self.cold()
        return self.ours("warm", "warm start (injected, the same node again)")

    def baseline_docs(self) -> list[dict[str, Any]]:
        assert self.shaped is not None
        assert self.manifest is not None
        _, name, version = self.identity()
        store = self.shaped.store
        spec = {
            "endpoint": store.endpoint,
            "bucket": store.bucket,
            "dest": "/models",
            "connections": 16,
            "range_bytes": 8 * MIB,
            "files": [
                {"key": self.plain_key(name, version, f.path), "path": f.path, "size": f.size}
                for f in self.manifest.files
            ],
        }
        config_map = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "fetch-model", "namespace": BASELINE_NAMESPACE},
            "data": {"fetch_model.py": FETCH_SCRIPT.read_text(), "spec.json": json.dumps(spec)},
        }
        docs = []
        for doc in example_docs():
            doc["metadata"]["namespace"] = BASELINE_NAMESPACE
            docs.append(doc)
        deployment = deployment_of(docs)
        deployment["spec"]["replicas"] = 1
        template = deployment["spec"]["template"]
        template["metadata"]["labels"].pop("juicefs.bentoml.com/model-store", None)
        template["metadata"].get("annotations", {}).pop("juicefs.bentoml.com/cache-size", None)
        pod = template["spec"]
        pod["volumes"] = [
            *pod.get("volumes", []),
            {"name": "models", "emptyDir": {}},
            {"name": "fetch", "configMap": {"name": "fetch-model"}},
        ]
        pod["initContainers"] = [
            {
                "name": "fetch-model",
                "image": SAMPLE_BENTO_IMAGE,
                "imagePullPolicy": "IfNotPresent",
                "command": ["python3", "/fetch/fetch_model.py", "/fetch/spec.json"],
                "volumeMounts": [
                    {"name": "models", "mountPath": "/models"},
                    {"name": "fetch", "mountPath": "/fetch", "readOnly": True},
                ],
            }
        ]
        main = pod["containers"][0]
        main["volumeMounts"] = [
            *main.get("volumeMounts", []),
            {"name": "models", "mountPath": MODELS_PATH, "readOnly": True},
        ]
        return [config_map, *docs]

    def baseline(self) -> StartResult:
        if "baseline" not in self.results:
            self.cp.create_namespace(BASELINE_NAMESPACE)
            result = self.apply_and_wait(
                BASELINE_NAMESPACE, self.baseline_docs(), "baseline (download, then start)"
            )
            self.results["baseline"] = result
        return self.results["baseline"]


class SharedSession:
    """The one cluster cold-start and warm-start share: started on first use, stopped by close().

    The caller owns it (benchmarks/__main__.py makes one per run) and passes
    it to both scenarios, so no module state outlives a run.
    """

    def __init__(self) -> None:
        self._session: Session | None = None

    def get(self, args: argparse.Namespace) -> Session:
        if self._session is None:
            self._session = Session(args)
            try:
                self._session.start()
            except BaseException:
                self.close()
                raise
        return self._session

    def close(self) -> None:
        """Stop the shared cluster and remove its storage network (idempotent)."""
        current, self._session = self._session, None
        if current is not None:
            current.stop()


def _common(s: Session, scenario: str) -> dict[str, Any]:
    assert s.manifest is not None
    record = new_record(
        scenario,
        {
            "model_mib": s.args.cold_size_mib,
            "shards": 4,
            "profile": {"mb_per_s": s.profile.mb_per_s, "delay_ms": s.profile.delay_ms},
            "deployment": str(EXAMPLE.relative_to(REPO)) + " with replicas: 1",
            "node": "the local real node (containerd + kubelet), its pods reach MinIO over a "
            "veth to the store's netns with the same tbf as the host link",
        },
    )
    record["versions"] = s.versions
    bytes_ = s.manifest.total_bytes
    raw_bps = s.raw["mib_per_s"] * MIB
    record["model_bytes"] = bytes_
    record["raw_mb_per_s"] = s.raw["mib_per_s"]  # MiB/s, as every rate here
    record["raw"] = s.raw
    record["transfer_s"] = round(bytes_ / raw_bps, 2)
    record["cold_start_limit_s"] = round(1.15 * bytes_ / raw_bps + 5, 2)
    return record


def _models_ready(result: StartResult) -> str:
    return next((e["message"] for e in result.events if e["reason"] == "ModelsReady"), "")


def app_load_seconds(result: StartResult) -> float | None:
    """How long the app took to read and hash its model, by its own log line."""
    for line in reversed(result.app_log):
        if (match := _APP_LOADED.search(line)) is not None:
            return float(match["s"])
    return None


def pod_start_seconds(baseline: StartResult) -> float | None:
    """Apply to the app container running, without the model's download: the
    baseline's `main running` less its init container's download (running to
    finished). What any pod of this image on this node costs before its app."""
    m = baseline.milestones
    needed = ("main running", "fetch-model running", "fetch-model finished")
    if not all(k in m for k in needed):
        return None
    download = m["fetch-model finished"] - m["fetch-model running"]
    return round(m["main running"] - download, 2)


def run_cold(args: argparse.Namespace, shared: SharedSession) -> dict[str, Any]:
    s = shared.get(args)
    cold = s.cold()
    baseline = s.baseline()
    record = _common(s, "cold-start")
    record["cold_start_s"] = round(cold.seconds, 2)
    record["baseline_s"] = round(baseline.seconds, 2)
    record["cold_start_vs_limit"] = round(cold.seconds / record["cold_start_limit_s"], 3)
    record["cold_start_vs_baseline"] = round(cold.seconds / baseline.seconds, 3)
    record["models_ready_event"] = _models_ready(cold)
    record["pod_start_s"] = pod_start_seconds(baseline)
    record["app_local_load_s"] = app_load_seconds(baseline)
    record["app_cold_load_s"] = app_load_seconds(cold)
    record["runs"] = {"cold": cold.as_dict(), "baseline": baseline.as_dict()}
    return record


def run_warm(args: argparse.Namespace, shared: SharedSession) -> dict[str, Any]:
    s = shared.get(args)
    cold = s.cold()
    record = _common(s, "warm-start")
    record["cold_start_s"] = round(cold.seconds, 2)
    message = _models_ready(cold)
    match = _READY_MESSAGE.search(message)
    node_mode = _SEALED in message or (match is not None and match["mode"] == "node")
    if not node_mode:
        record["node_cache"] = (
            "not there yet: the sidecar's ModelsReady Event names no node cache "
            f"({message!r}); warm start needs cache mode `node` (issue 7)"
        )
        record["warm_start_s"] = None
        record["node_cache_fraction"] = None
        return record
    warm = s.warm()
    message = _models_ready(warm)
    fraction = re.search(r"MiB \((?P<pct>[\d.]+)%\) from the node cache", message)
    record["warm_start_s"] = round(warm.seconds, 2)
    record["warm_vs_cold"] = round(warm.seconds / cold.seconds, 3)
    record["app_warm_load_s"] = app_load_seconds(warm)
    baseline = s.baseline()
    pod_start, local_load = pod_start_seconds(baseline), app_load_seconds(baseline)
    record["pod_start_s"], record["app_local_load_s"] = pod_start, local_load
    if pod_start is not None and local_load is not None:
        # Issue 18's target: at most 1.2 x (pod start + the app's load from local disk).
        record["warm_start_target_s"] = round(1.2 * (pod_start + local_load), 2)
        record["warm_start_vs_target"] = round(warm.seconds / record["warm_start_target_s"], 3)
    if fraction is not None:
        record["node_cache_fraction"] = float(fraction["pct"]) / 100
    else:
        # A seal checks that every block of the pod's files is in the node cache.
        record["node_cache_fraction"] = 1.0 if _SEALED in message else None
    record["models_ready_event"] = message
    record["runs"] = {
        "cold": cold.as_dict(),
        "warm": warm.as_dict(),
        "baseline": baseline.as_dict(),
    }
    return record


def table(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    limit = record["cold_start_limit_s"]
    rows = [
        (
            f"raw GETs under {record['settings']['profile']['mb_per_s']:g} MB/s cap",
            f"{record['raw_mb_per_s']} MiB/s",
            f"{record['model_bytes'] / MIB:.0f} MiB in {record['transfer_s']} s; "
            f"limit 1.15x + 5 s = {limit} s",
        )
    ]
    if record["scenario"] == "cold-start":
        rows.append(
            (
                "cold start, apply to Ready (injected)",
                f"{record['cold_start_s']} s",
                f"{record['cold_start_vs_limit']:.2f}x the limit",
            )
        )
        rows.append(
            (
                "baseline: download whole model, then start",
                f"{record['baseline_s']} s",
                f"ours is {record['cold_start_vs_baseline']:.2f}x of it",
            )
        )
        rows.append(
            (
                "the app's own load: cold (ours), local emptyDir (baseline)",
                f"{record['app_cold_load_s']} s",
                f"{record['app_local_load_s']} s local; pod start {record['pod_start_s']} s",
            )
        )
    else:
        if record["warm_start_s"] is None:
            rows.append(("warm start", "n/a", record["node_cache"]))
        else:
            rows.append(
                (
                    "warm start, apply to Ready on a warm node",
                    f"{record['warm_start_s']} s",
                    f"{record['warm_vs_cold']:.2f}x cold ({record['cold_start_s']} s); "
                    f"{(record['node_cache_fraction'] or 0):.1%} of bytes from the node cache",
                )
            )
            if record.get("warm_start_target_s") is not None:
                rows.append(
                    (
                        "warm start vs 1.2 x (pod start + the app's local load)",
                        f"{record['warm_start_target_s']} s",
                        f"{record['warm_start_vs_target']:.2f}x the target; the app's warm "
                        f"load {record['app_warm_load_s']} s, local {record['app_local_load_s']} s",
                    )
                )
    return rows
