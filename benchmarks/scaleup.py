"""Scale-up across real nodes: warm and cold, where replicas land, what the store serves,
and what the webhook costs a burst of pods.

One local cluster with `--nodes` (3) real nodes of one GPU pool (a GPU each,
so one replica per node, as on a real pool), the injector and the node agent;
MinIO behind a shaped link to each node (`--cold-profile`, 200 MB/s: each
node's link to the store is capped alike, as each node's share of a cloud
store is its NIC's). The example Bento (`examples/bento-deployment.yaml`, the
real BentoML app that reads and hashes its model) with a `--scale-mib` model:

- cold: a new Bento version, no node has it (the agent without prewarm):
  scale 0 -> N, to every replica Ready (`cold_all_ready_s`); MinIO's served
  bytes against the model's size (`origin_bytes_ratio`, about N: every node
  fetches every byte) and the bytes each node's link carried;
- placement: another version, warm on one node only (one replica ran there);
  then `--placements` times one replica is created and deleted: the fraction
  that landed on the warm node (`warm_placement_fraction`);
- warm: another version, the agent with prewarm warms it on every node
  before any pod; scale 0 -> N (`all_ready_s`), then 0 -> 1 on a warm node
  (`warm_start_s`, the same run): the target is all_ready_s at most 1.3x
  warm_start_s;
- admission burst: `--burst-pods` (1,000) Bento pods created as server-side
  dry runs, `--burst-concurrency` (8) at a time, through the real apiserver:
  in the opted-in namespace (the webhook mutates each) and in one not opted
  in (the webhook's namespaceSelector does not match, nothing else
  changes); `admission_burst_overhead` is with / without - 1, medians of
  `--burst-rounds` alternating rounds.

bench-results/scale-up.json holds every figure and the load average at each step.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import ssl
import statistics
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from benchmarks.agent_lists import cpu_seconds
from benchmarks.cluster import ShapedCluster
from benchmarks.coldstart import (
    OURS_NAMESPACE,
    deployment_of,
    disk_shortfall,
    example_identity,
    ours_docs,
)
from benchmarks.record import MIB, load, new_record, say
from benchmarks.store import ShapedStorage
from common.warm import warm_label_key
from devcluster.cluster import wait_for
from devcluster.control.plane import ControlPlane
from devcluster.installs.node_agent import (
    LocalNodeAgent,
)
from devcluster.storage.minio_metrics import store_requests
from devcluster.storage.shaped_link import LinkProfile
from devcluster.storage.stack import PATH_TEMPLATE, write_random_model
from modelstore.manifest import Manifest
from modelstore.publish import publish

SCENARIO = "scale-up"
SHARDS = 4
PLAIN_NAMESPACE = "bento-not-opted-in"  # the burst without the webhook
# all_ready_s may take this much longer than one warm start (issue 19).
ALL_READY_FACTOR = 1.3
PLACEMENT_TARGET = 0.95
BURST_OVERHEAD_TARGET = 0.02
READY_TIMEOUT = 900.0


# -- pure parts ---------------------------------------------------------------


def ratio(part: float | None, whole: float | None) -> float | None:
    if part is None or not whole:
        return None
    return round(part / whole, 3)


def overhead(with_webhook: Sequence[float], without: Sequence[float]) -> float | None:
    """with / without - 1, of the medians of each side's rounds."""
    if not with_webhook or not without:
        return None
    base = statistics.median(without)
    return round(statistics.median(with_webhook) / base - 1, 4) if base else None


INJECTOR_CMDLINE = b"-m\0injector\0serve\0"


def injector_pids() -> list[int]:
    """The injector's server processes on this host (its replicas' containers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if INJECTOR_CMDLINE in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def cpu_of(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue
    return total


def placement_fraction(landed: Sequence[str], warm: str) -> float | None:
    return round(landed.count(warm) / len(landed), 3) if landed else None


def is_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def burst_pod(docs: list[dict[str, Any]], index: int) -> dict[str, Any]:
    """The example's pod template as a Pod of its own (a Bento pod the webhook mutates)."""
    template = deployment_of(docs)["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "name": f"burst-{index}"},
        "spec": template["spec"],
    }


# -- the cluster --------------------------------------------------------------


class ScaleSession:
    """The cluster with several nodes, its shaped store, the example's Deployment."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.nodes: int = args.nodes
        self.profile: LinkProfile = args.cold_profile
        self.cluster = ShapedCluster("bench-scaleup-", args.work_dir, node_count=self.nodes)
        self.tmp = self.cluster.work
        self.cp: ControlPlane = self.cluster.cp
        self.versions: dict[str, str] = {}
        self.source = self.tmp / "model" / "models"  # write_random_model's models/ dir
        # The example's Deployment and Bento, read once: their names never change.
        self.deployment, self.repository, self.base_version = example_identity()

    @property
    def storage(self) -> ShapedStorage:
        return self.cluster.storage

    @property
    def agent(self) -> LocalNodeAgent:
        return self.cluster.agent

    def start(self) -> None:
        usage = shutil.disk_usage(self.tmp)
        # Each node holds a copy of each of the three versions (disk_shortfall counts 5).
        held = self.nodes * self.args.scale_mib * MIB
        if (problem := disk_shortfall(usage.free, usage.total, held)) is not None:
            raise RuntimeError(f"{self.tmp}: {problem}")
        say(SCENARIO, f"starting a local cluster of {self.nodes} nodes in {self.tmp}")
        self.versions = self.cluster.start()
        self.cp.create_namespace(OURS_NAMESPACE, {"juicefs.bentoml.com/injection": "enabled"})
        self.cp.wait_provisioned(OURS_NAMESPACE)
        self.cp.create_namespace(PLAIN_NAMESPACE)
        # The example's ServiceAccount there too: the burst's pods name it.
        account = next(d for d in ours_docs("x") if d["kind"] == "ServiceAccount")
        account["metadata"]["namespace"] = PLAIN_NAMESPACE
        self.cp.apply(account)
        say(SCENARIO, f"writing the {self.args.scale_mib} MiB model's files ({SHARDS} shards)")
        self.source = write_random_model(
            self.tmp / "model", [self.args.scale_mib * MIB // SHARDS] * SHARDS
        )
        self.storage.shape(self.profile)

    def stop(self) -> None:
        self.cluster.stop()

    # -- the Deployment ---------------------------------------------------------

    def publish(self, version: str) -> Manifest:
        self.storage.shape(None)  # publishing is the harness's, not the measured link's
        try:
            stack = self.storage.stack
            return publish(self.source, stack.writer_mount, PATH_TEMPLATE, self.repository, version)
        finally:
            self.storage.shape(self.profile)

    def docs(self, version: str) -> list[dict[str, Any]]:
        docs = ours_docs(version)
        deployment_of(docs)["spec"]["replicas"] = 0
        return docs

    def apply(self, version: str) -> None:
        self.cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(self.docs(version)))

    def scale(self, replicas: int) -> None:
        self.cp.kubectl(
            "scale", "deployment", self.deployment, "-n", OURS_NAMESPACE, f"--replicas={replicas}"
        )

    def pods(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.cp.get_json("pods", "-n", OURS_NAMESPACE)["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def scale_to_ready(self, replicas: int, what: str) -> float:
        """Scale, then seconds until that many replicas are Ready."""
        started = time.monotonic()
        self.scale(replicas)

        def ready() -> bool:
            pods = self.pods()
            return len(pods) == replicas and all(is_ready(p) for p in pods)

        wait_for(ready, timeout=READY_TIMEOUT, interval=0.2, what=what)
        seconds = round(time.monotonic() - started, 2)
        say(SCENARIO, f"{what}: {replicas} Ready in {seconds} s (load {load()['1m']})")
        return seconds

    def scale_to_zero(self) -> None:
        self.scale(0)
        wait_for(
            lambda: not self.cp.get_json("pods", "-n", OURS_NAMESPACE)["items"],
            timeout=300,
            interval=0.3,
            what=f"the pods in {OURS_NAMESPACE} gone",
        )

    def warm_nodes(self, version: str) -> list[str]:
        label = warm_label_key(self.repository, version)
        nodes = self.cp.get_json("nodes", "-l", label)["items"]
        return sorted(n["metadata"]["name"] for n in nodes)

    # -- the steps --------------------------------------------------------------------

    def cold(self, version: str) -> dict[str, Any]:
        manifest = self.publish(version)
        self.apply(version)
        net = self.storage.net
        links = [net.sent_bytes(index) for index in range(self.nodes)]
        before = store_requests(self.storage.store)
        load_at = load()
        seconds = self.scale_to_ready(self.nodes, f"cold scale-up 0 -> {self.nodes}")
        served = store_requests(self.storage.store) - before
        per_node = [net.sent_bytes(index) - links[index] for index in range(self.nodes)]
        self.scale_to_zero()
        return {
            "cold_all_ready_s": seconds,
            "model_bytes": manifest.total_bytes,
            "origin_bytes": served.bytes_sent,
            "origin_gets": served.gets,
            "origin_bytes_ratio": ratio(served.bytes_sent, manifest.total_bytes),
            "origin_link_bytes_per_node": per_node,
            "load_at_cold": load_at,
        }

    def placements(self, version: str) -> dict[str, Any]:
        self.publish(version)
        self.apply(version)
        self.scale_to_ready(1, "placement: the first replica")
        warm = wait_for(
            lambda: self.warm_nodes(version) or None, timeout=120, what="the warm label"
        )
        self.scale_to_zero()
        (node,) = warm
        landed: list[str] = []
        for index in range(self.args.placements):
            self.scale(1)

            def placed() -> str | None:
                pods = self.pods()
                name = pods[0]["spec"].get("nodeName") if pods else None
                return str(name) if name else None

            landed.append(wait_for(placed, timeout=120, what=f"placement {index}"))
            self.scale_to_zero()
        fraction = placement_fraction(landed, node)
        say(SCENARIO, f"placement: {landed.count(node)}/{len(landed)} on the warm node {node}")
        return {"warm_placement_fraction": fraction, "placements": landed, "warm_node": node}

    def warm(self, version: str) -> dict[str, Any]:
        manifest = self.publish(version)
        self.agent.install(prewarm=True)
        try:
            self.apply(version)
            started = time.monotonic()
            wait_for(
                lambda: len(self.warm_nodes(version)) == self.nodes or None,
                timeout=READY_TIMEOUT,
                what=f"{version} warm on every node",
            )
            prewarm_s = round(time.monotonic() - started, 2)
            say(SCENARIO, f"prewarmed on {self.nodes} nodes in {prewarm_s} s")
            before = store_requests(self.storage.store)
            load_at = load()
            all_ready = self.scale_to_ready(self.nodes, f"warm scale-up 0 -> {self.nodes}")
            served = store_requests(self.storage.store) - before
            self.scale_to_zero()
            load_single = load()
            single = self.scale_to_ready(1, "warm start of one replica")
            self.scale_to_zero()
        finally:
            self.agent.restore()
        return {
            "all_ready_s": all_ready,
            "warm_start_s": single,
            "all_ready_vs_warm_start": ratio(all_ready, single),
            "prewarm_all_nodes_s": prewarm_s,
            "warm_store_bytes": served.bytes_sent,
            "warm_model_bytes": manifest.total_bytes,
            "load_at_warm_scale_up": load_at,
            "load_at_warm_start": load_single,
        }

    def burst(self) -> dict[str, Any]:
        docs = self.docs("burst")
        rounds: dict[str, list[float]] = {"with": [], "without": []}
        pods = self.args.burst_pods
        # A first small burst each, so neither side pays the connections' set-up.
        for namespace in (OURS_NAMESPACE, PLAIN_NAMESPACE):
            dry_run_burst(self.cp, namespace, docs, 50, self.args.burst_concurrency)
        # Where the CPU goes (two cores for everything): the apiserver's, the injector's.
        apiserver = [self.cp.pids["kube-apiserver"]]
        injector = injector_pids()
        cpu: dict[str, list[dict[str, float]]] = {"with": [], "without": []}
        for _ in range(self.args.burst_rounds):
            for side, namespace in (("without", PLAIN_NAMESPACE), ("with", OURS_NAMESPACE)):
                spent = (cpu_of(apiserver), cpu_of(injector))
                seconds = dry_run_burst(self.cp, namespace, docs, pods, self.args.burst_concurrency)
                rounds[side].append(seconds)
                cpu[side].append(
                    {
                        "apiserver_s": round(cpu_of(apiserver) - spent[0], 2),
                        "injector_s": round(cpu_of(injector) - spent[1], 2),
                    }
                )
                say(
                    SCENARIO,
                    f"burst of {pods} dry-run pods {side} the webhook: {seconds} s "
                    f"(CPU {cpu[side][-1]})",
                )
        return {
            "admission_burst_cpu": cpu,
            "injector_processes": len(injector),
            "admission_burst_overhead": overhead(rounds["with"], rounds["without"]),
            "admission_burst_with_s": rounds["with"],
            "admission_burst_without_s": rounds["without"],
            "burst_pods": pods,
            "burst_concurrency": self.args.burst_concurrency,
        }


def dry_run_burst(
    cp: ControlPlane, namespace: str, docs: list[dict[str, Any]], pods: int, concurrency: int
) -> float:
    """Wall seconds to create `pods` Bento pods as server-side dry runs, `concurrency` at a
    time, each worker on one kept-alive connection as the admin (no kubectl per pod)."""
    url = urlsplit(cp.server)
    context = ssl.create_default_context(cafile=str(cp.pki.ca.cert))
    context.load_cert_chain(str(cp.pki.admin.cert), str(cp.pki.admin.key))
    path = f"/api/v1/namespaces/{namespace}/pods?dryRun=All"
    bodies = [json.dumps(burst_pod(docs, index)).encode() for index in range(pods)]

    def worker(start: int) -> None:
        conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=context)
        try:
            for body in bodies[start::concurrency]:
                conn.request("POST", path, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                answer = response.read()
                if response.status != 201:
                    raise RuntimeError(f"dry-run create: HTTP {response.status}: {answer[:300]!r}")
        finally:
            conn.close()

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return round(time.monotonic() - started, 3)


def run(args: argparse.Namespace) -> dict[str, Any]:
    session = ScaleSession(args)
    record = new_record(
        SCENARIO,
        {
            "nodes": args.nodes,
            "model_mib": args.scale_mib,
            "shards": SHARDS,
            "profile": {
                "mb_per_s": args.cold_profile.mb_per_s,
                "delay_ms": args.cold_profile.delay_ms,
            },
            "link": "one shaped link from the store to each node, each capped alike",
            "placements": args.placements,
            "deployment": "examples/bento-deployment.yaml, one GPU per pod and per node",
        },
    )
    try:
        session.start()
        record["versions"] = session.versions
        record["nodes"] = args.nodes
        base = session.base_version
        record.update(session.cold(f"{base}-scale-cold"))
        record.update(session.placements(f"{base}-scale-placed"))
        record.update(session.warm(f"{base}-scale-warm"))
        record.update(session.burst())
    finally:
        session.stop()
    record["all_ready_target"] = ALL_READY_FACTOR
    record["warm_placement_target"] = PLACEMENT_TARGET
    record["admission_burst_overhead_target"] = BURST_OVERHEAD_TARGET
    return record


def _num(value: object, unit: str = " s") -> str:
    return "n/a" if value is None else f"{value}{unit}"


def table(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    nodes = record.get("nodes")
    mib = record["settings"]["model_mib"]
    return [
        (
            f"{mib} MiB on {nodes} nodes: warm scale-up 0 -> {nodes}, to all Ready",
            _num(record.get("all_ready_s")),
            f"{_num(record.get('all_ready_vs_warm_start'), 'x')} one warm start "
            f"({_num(record.get('warm_start_s'))}); target {ALL_READY_FACTOR}x",
        ),
        (
            f"{mib} MiB on {nodes} nodes: cold scale-up, to all Ready",
            _num(record.get("cold_all_ready_s")),
            f"the store served {_num(record.get('origin_bytes_ratio'), 'x')} the model",
        ),
        (
            "replicas placed on the node where the Bento is warm",
            _num(record.get("warm_placement_fraction"), ""),
            f"of {len(record.get('placements') or [])}; target {PLACEMENT_TARGET}",
        ),
        (
            f"{record.get('burst_pods')} dry-run Bento pods, {record.get('burst_concurrency')} "
            "at a time: webhook overhead",
            _num(record.get("admission_burst_overhead"), ""),
            f"with {record.get('admission_burst_with_s')} s, without "
            f"{record.get('admission_burst_without_s')} s; target {BURST_OVERHEAD_TARGET}",
        ),
    ]
