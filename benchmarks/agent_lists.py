"""Agent lists: what one node agent costs the apiserver, idle, with 5,000 Deployments; its memory.

A real control plane (devcluster.ControlPlane: etcd, kube-apiserver,
controller-manager, scheduler; no kubelet) on free ports in a temporary
directory, one opted-in namespace, one Node (an API object) and
`--agent-deployments` Deployments of Bento pods (replicas 0, a pod cache
each by annotation, so the agent warms nothing; each template about the
size of a real Bento's: labels, annotations, a container with env, probes
and resources). Then the real agent, `python -m nodeagent run` as the
DaemonSet runs it (its own process, in a private mount namespace: its pod
mounts make a tmpfs stage), against the admin kubeconfig:

1. started on the empty namespace: its VmRSS once its caches are synced;
2. the Deployments created (64 at a time);
3. started again: how long its first (paginated) LIST takes, its VmRSS
   once synced, then `--idle-seconds` idle (default 600), VmRSS sampled
   every 10 s; the apiserver's `apiserver_request_total` (its /metrics)
   before and after the window gives LIST and WATCH requests per minute,
   by resource;
4. with `--baseline-ref REF`: the same window (`--baseline-seconds`) with
   the agent of that commit (`git archive`), for a measured before/after;
   without it, the old code's rate is computed (3 LISTs every 10 s
   resync, and 2 more per 300 s watch: 18.4 a minute);
5. one unpaginated LIST of every Deployment, as each of the old code's
   reconciles made: its bytes and seconds.

Figures: workload LISTs a minute (namespaces, deployments, statefulsets)
against the old code's, WATCHes a minute, the pod LISTs of the pod mounts
(unchanged, field-selected to the node) shown apart, and the RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from benchmarks.record import REPO, new_record, say
from common.processes import spawn_group, stop_group
from devcluster import ControlPlane
from injector.config import InjectorConfig
from injector.kube import new_api_client

SCENARIO = "agent-lists"
NODE = "bench-node"
NAMESPACE = "bench-bentos"
WORKLOAD_RESOURCES = ("namespaces", "deployments", "statefulsets")
# The old agent: 3 LISTs (namespaces, deployments, statefulsets) every 10 s resync,
# and 2 (deployments, statefulsets) each time its 300 s watches ended.
OLD_RESYNC_SECONDS, OLD_WATCH_SECONDS = 10.0, 300.0
OLD_LISTS_PER_MINUTE = 3 * 60 / OLD_RESYNC_SECONDS + 2 * 60 / OLD_WATCH_SECONDS
SAMPLE_SECONDS = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("agent-lists")
    g.add_argument("--agent-deployments", type=int, default=5000)
    g.add_argument("--idle-seconds", type=float, default=600.0, help="the idle window")
    g.add_argument(
        "--baseline-ref",
        default="",
        help="also run the agent of this git commit for --baseline-seconds (before/after)",
    )
    g.add_argument("--baseline-seconds", type=float, default=120.0)


def deployment(index: int, config: InjectorConfig) -> dict[str, Any]:
    """A Bento Deployment as a chart makes it, its pods on a pod cache (nothing to warm)."""
    labels = {"app.kubernetes.io/name": f"svc-{index:05d}", "app.kubernetes.io/instance": "bench"}
    template_labels = {
        **labels,
        config.labels.model_store: config.labels.model_store_value,
        config.labels.bento_repository: f"svc-{index % 50:02d}",
        config.labels.bento_version: "v1",
    }
    env = [{"name": f"BENTOML_SETTING_{i}", "value": f"value-{index}-{i}"} for i in range(20)]
    probe = {"httpGet": {"path": "/readyz", "port": 3000}, "periodSeconds": 5}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": f"svc-{index:05d}",
            "namespace": NAMESPACE,
            "labels": labels,
            "annotations": {"meta.helm.sh/release-name": "bench"},
        },
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": template_labels,
                    "annotations": {config.annotations.cache_mode: "pod"},
                },
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": f"us-docker.pkg.dev/p/r/svc-{index % 50:02d}:v1",
                            "ports": [{"containerPort": 3000, "name": "http"}],
                            "env": env,
                            "resources": {
                                "requests": {"cpu": "1", "memory": "4Gi"},
                                "limits": {"memory": "8Gi"},
                            },
                            "readinessProbe": probe,
                            "livenessProbe": probe,
                        }
                    ],
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                },
            },
        },
    }


async def create_deployments(kubeconfig: Path, count: int, config: InjectorConfig) -> None:
    api_client = await new_api_client(str(kubeconfig))
    try:
        apps = client.AppsV1Api(api_client)
        gate = asyncio.Semaphore(64)

        async def create(index: int) -> None:
            async with gate:
                body: Any = deployment(index, config)  # the client sends a dict as it is
                await apps.create_namespaced_deployment(NAMESPACE, body)

        await asyncio.gather(*(create(i) for i in range(count)))
    finally:
        await api_client.close()


REQUEST = re.compile(r"^apiserver_request_total\{([^}]*)\} ([0-9.e+]+)$")


def request_counts(cp: ControlPlane) -> dict[str, float]:
    """apiserver_request_total by "VERB resource" (summed over codes, scopes, clients)."""
    text = cp.kubectl("get", "--raw", "/metrics").stdout
    counts: dict[str, float] = {}
    for line in text.splitlines():
        match = REQUEST.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        key = f"{labels.get('verb')} {labels.get('resource')}"
        counts[key] = counts.get(key, 0.0) + float(match.group(2))
    return counts


def per_minute(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, Any]:
    """LIST and WATCH requests a minute between two request_counts, by resource."""
    rates = {
        key: round((after.get(key, 0.0) - before.get(key, 0.0)) * 60 / seconds, 2)
        for key in after
        if key.split()[0] in ("LIST", "WATCH")
    }
    rates = {key: rate for key, rate in sorted(rates.items()) if rate}
    workload_lists = sum(rates.get(f"LIST {r}", 0.0) for r in WORKLOAD_RESOURCES)
    workload_watches = sum(rates.get(f"WATCH {r}", 0.0) for r in WORKLOAD_RESOURCES)
    return {
        "by_resource": rates,
        "workload_lists": round(workload_lists, 2),
        "workload_watches": round(workload_watches, 2),
        "pod_lists": rates.get("LIST pods", 0.0),
        "all_lists": round(sum(v for k, v in rates.items() if k.startswith("LIST ")), 2),
    }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


@contextlib.contextmanager
def agent(tree: Path, cp: ControlPlane, work: Path, name: str) -> Iterator[tuple[int, Path]]:
    """The agent of the checkout at tree, as the DaemonSet runs it; its pid and log."""
    log = work / f"{name}.log"
    dirs = {d: work / name / d for d in ("credentials", "work", "kubelet")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    command = [
        # Its own mount namespace: the pod mounts' tmpfs stage ends with it.
        "unshare",
        "--mount",
        "--propagation",
        "private",
        sys.executable,
        "-m",
        "nodeagent",
        "run",
        "--kubeconfig",
        str(cp.kubeconfig),
        "--node-name",
        NODE,
        "--credentials-dir",
        str(dirs["credentials"]),
        "--work-dir",
        str(dirs["work"]),
        "--kubelet-root",
        str(dirs["kubelet"]),
        "--metrics-port",
        "0",
    ]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    process = spawn_group(command, log, env=env, cwd=tree, die_with_parent=True)
    try:
        yield process.pid, log
    finally:
        stop_group(process, 15)


def synced_objects(log: Path, resource: str) -> int | None:
    """How many objects the agent's last informer.synced of resource said, if any yet."""
    found = None
    for line in log.read_text(errors="replace").splitlines():
        if '"informer.synced"' not in line:
            continue
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("resource") == resource:
                found = int(entry.get("objects", 0))
    return found


def wait_synced(pid: int, log: Path, count: int, timeout: float = 300.0) -> float:
    """Seconds until the agent says it holds count Deployments (AssertionError if it died)."""
    started = time.monotonic()
    while (synced := synced_objects(log, "deployments")) is None or synced < count:
        if not Path(f"/proc/{pid}").exists() or time.monotonic() - started > timeout:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise AssertionError(f"the agent did not sync {count} Deployments:\n{tail}")
        time.sleep(0.2)
    return round(time.monotonic() - started, 2)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_window(cp: ControlPlane, pid: int, seconds: float) -> dict[str, Any]:
    """Requests a minute, the agent's CPU and its RSS over seconds of idling."""
    before = request_counts(cp)
    cpu_before = cpu_seconds(pid)
    started = time.monotonic()
    samples = [rss_mib(pid)]
    while (left := seconds - (time.monotonic() - started)) > 0:
        time.sleep(min(SAMPLE_SECONDS, left))
        samples.append(rss_mib(pid))
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pid) - cpu_before
    after = request_counts(cp)
    return {
        "seconds": round(elapsed, 1),
        "cpu_share": round(cpu / elapsed, 3),
        "per_minute": per_minute(before, after, elapsed),
        "rss_mib": {"first": samples[0], "last": samples[-1], "max": max(samples)},
    }


def baseline_tree(ref: str, into: Path) -> Path:
    """The checkout of ref (git archive), to run the old agent from."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True
    ).stdout
    tree = into / f"baseline-{ref}"
    tree.mkdir(parents=True)
    archive_path = into / "baseline.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(tree, filter="data")
    return tree


def full_list(cp: ControlPlane) -> dict[str, float]:
    """One unpaginated LIST of every Deployment, as each old reconcile made."""
    started = time.monotonic()
    body = cp.kubectl("get", "--raw", "/apis/apps/v1/deployments", timeout=120).stdout
    return {"bytes": len(body.encode()), "seconds": round(time.monotonic() - started, 2)}


def measure(cp: ControlPlane, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    config = InjectorConfig()
    count = args.agent_deployments
    labels = {config.labels.namespace_opt_in: config.labels.namespace_opt_in_value}
    cp.create_namespace(NAMESPACE, labels)
    cp.register_fake_node(NODE)
    result: dict[str, Any] = {}
    with agent(REPO, cp, work, "agent-empty") as (pid, log):
        wait_synced(pid, log, 0)
        time.sleep(3)  # its first pass, its pod mounts' first list
        result["rss_empty_mib"] = rss_mib(pid)
    say(SCENARIO, f"agent on an empty cluster: RSS {result['rss_empty_mib']} MiB")
    started = time.monotonic()
    asyncio.run(create_deployments(cp.kubeconfig, count, config))
    result["create_seconds"] = round(time.monotonic() - started, 1)
    say(SCENARIO, f"{count} Deployments created in {result['create_seconds']} s")
    before_start = request_counts(cp)
    with agent(REPO, cp, work, "agent") as (pid, log):
        result["sync_seconds"] = wait_synced(pid, log, count)
        time.sleep(3)
        result["rss_synced_mib"] = rss_mib(pid)
        started_counts = request_counts(cp)
        result["start_lists"] = {
            key: after - before_start.get(key, 0.0)
            for key, after in started_counts.items()
            if key.startswith("LIST ") and after != before_start.get(key, 0.0)
        }
        say(
            SCENARIO,
            f"agent synced {count} Deployments in {result['sync_seconds']} s, RSS "
            f"{result['rss_synced_mib']} MiB; idle for {args.idle_seconds:.0f} s",
        )
        result["idle"] = idle_window(cp, pid, args.idle_seconds)
    say(SCENARIO, f"idle: {json.dumps(result['idle'])}")
    if args.baseline_ref:
        tree = baseline_tree(args.baseline_ref, work)
        with agent(tree, cp, work, "agent-baseline") as (pid, log):
            time.sleep(15)  # its first passes (each lists everything)
            result["baseline"] = {
                "ref": args.baseline_ref,
                **idle_window(cp, pid, args.baseline_seconds),
            }
        say(SCENARIO, f"baseline {args.baseline_ref}: {json.dumps(result['baseline'])}")
    result["full_list"] = full_list(cp)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    record = new_record(
        SCENARIO,
        settings={
            "deployments": args.agent_deployments,
            "idle_seconds": args.idle_seconds,
            "baseline_ref": args.baseline_ref,
            "baseline_seconds": args.baseline_seconds,
            "old_lists_per_minute": OLD_LISTS_PER_MINUTE,
        },
    )
    with tempfile.TemporaryDirectory(prefix="bench-agent-lists-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        cp = ControlPlane(work / "cluster")
        try:
            cp.start()
            record["versions"] = {
                "kubernetes": json.loads(cp.kubectl("version", "-o", "json").stdout)[
                    "serverVersion"
                ]["gitVersion"]
            }
            record.update(measure(cp, args, work))
        finally:
            cp.stop()
    idle = record["idle"]["per_minute"]["workload_lists"]
    old = (
        record["baseline"]["per_minute"]["workload_lists"]
        if "baseline" in record
        else OLD_LISTS_PER_MINUTE
    )
    record["workload_lists_vs_old"] = round(idle / old, 4) if old else None
    return record


def table(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    idle = record["idle"]
    rates = idle["per_minute"]
    count = record["settings"]["deployments"]
    if "baseline" in record:
        base = record["baseline"]
        old = (
            f"{base['per_minute']['workload_lists']}/min measured for {base['ref']} "
            f"over {base['seconds']:.0f} s"
        )
    else:
        old = f"{OLD_LISTS_PER_MINUTE}/min computed for the old code"
    rows = [
        (
            f"workload LISTs, idle {idle['seconds']:.0f} s, {count} Deployments",
            f"{rates['workload_lists']}/min",
            f"{record['workload_lists_vs_old']}x the old {old}",
        ),
        (
            "workload WATCHes (namespaces, deployments, statefulsets)",
            f"{rates['workload_watches']}/min",
            "re-watched from the last resourceVersion, no relist",
        ),
        (
            "pod LISTs (the pod mounts: this node's pods, unchanged)",
            f"{rates['pod_lists']}/min",
            f"all LISTs {rates['all_lists']}/min",
        ),
        (
            "agent CPU while idling (the resync passes read the cache)",
            f"{idle['cpu_share']:.1%} of a core",
            ""
            if "baseline" not in record
            else f"baseline {record['baseline']['cpu_share']:.1%} of a core",
        ),
        (
            f"agent RSS with {count} Deployments cached",
            f"{record['rss_synced_mib']} MiB",
            f"{round(record['rss_synced_mib'] - record['rss_empty_mib'], 1):+} MiB over the "
            f"empty cluster's {record['rss_empty_mib']} MiB; "
            f"{idle['rss_mib']['last']} MiB after idling (max {idle['rss_mib']['max']})",
        ),
        (
            "first sync (paginated LIST of every Deployment)",
            f"{record['sync_seconds']} s",
            f"LISTs at start: {json.dumps(record['start_lists'])}",
        ),
        (
            "one unpaginated LIST of every Deployment (each old pass)",
            f"{record['full_list']['bytes'] / (1 << 20):.1f} MiB",
            f"{record['full_list']['seconds']} s via kubectl",
        ),
    ]
    if "baseline" in record:
        base = record["baseline"]
        rows.append(
            (
                f"baseline agent ({base['ref']}) RSS while idling",
                f"{base['rss_mib']['last']} MiB",
                f"max {base['rss_mib']['max']} MiB; "
                f"all LISTs {base['per_minute']['all_lists']}/min",
            )
        )
    return rows
