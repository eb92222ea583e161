"""Cold start and warm start on the real node, at two model sizes: medians of repeated runs.

One local cluster (`devcluster.local.local_cluster`: control plane, the real
node, the injector, the node agent) whose storage is MinIO behind a shaped
link (`benchmarks.store`): the node's pods reach the store over a veth
straight between the node's and the store's network namespaces, shaped like
the host's. For each model size, the small one (`--cold-size-mib`, 2 GiB)
and the large one (`--cold-large-mib`, 8 GiB; 0 skips it), random model
files (4 shards) are written once and uploaded once as plain objects for
the baseline. Then, `--repeats` times (3):

- publish: the same files into JuiceFS as a new version of the example's
  Bento (`<the example's version>-<MiB>m-r<n>`, set as the pod template's
  `yatai.ai/bento-version`). New files are new JuiceFS blocks, so the node
  cache holds none of them and every repeat's cold start is really cold
  (each repeat's `cached_before_cold`, 0, is the count of its blocks found
  in the node cache before its cold start);
- raw (the first repeat of each size): parallel GETs of the model's block
  objects over the shaped link: the limit is 1.15 x model bytes / that
  rate + 5 s;
- cold start (ours): `kubectl apply` of examples/bento-deployment.yaml
  (one replica: the node has one GPU) in an opted-in namespace, to pod Ready
  (the sidecar verified every byte; the app's own readiness probe passed);
- warm start: the Deployment deleted and applied again on the same node, so
  the sidecar finds the blocks in the node cache (cache mode `node`, issue 7);
  the fraction of bytes from the node cache is what its ModelsReady Event says;
- clean-up: the version removed through the writer mount (its objects leave
  MinIO at once: the volume has no trash) and its blocks from the node
  cache, so that 8 GiB models do not pile up on the disk across repeats;
- baseline (what users do today): the same Deployment, not injected, with an
  init container that downloads the whole model with 16 parallel ranged GETs
  (`benchmarks/fetch_model.py`, in the Bento's own image) into an emptyDir
  before the app starts; apply to Ready.

Every figure is the median over the repeats, the large model's under the
same key with `_large` (`cold_start_s`, `cold_start_s_large`); `spread`
holds each one's (min, max), and `runs` every run ("small" and "large", a
list each) with the load average at the start of each apply. The warm
target is 1.2 x (pod start + the app's start from local disk), both from
the baseline's milestones (see `warm_target_seconds`).

Both scenarios share one cluster and one set of runs when run in one
`make bench`: cold-start.json and warm-start.json are built from the same
runs (`Session.runs`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.cluster import ShapedCluster
from benchmarks.record import MIB, REPO, load, new_record, say
from benchmarks.store import ShapedStorage
from common.pagecache import advise_files
from devcluster.control.plane import ControlPlane
from devcluster.images import SAMPLE_BENTO_IMAGE
from devcluster.node.host import node_cache_dir
from devcluster.storage.minio_metrics import store_requests
from devcluster.storage.s3 import read_objects
from devcluster.storage.shaped_link import LinkProfile
from devcluster.storage.stack import PATH_TEMPLATE, write_random_model
from modelstore.manifest import Manifest, ManifestFile
from modelstore.publish import publish
from nodeagent.warmer import LOCAL_COPIES_DIR

EXAMPLE = REPO / "examples" / "bento-deployment.yaml"
FETCH_SCRIPT = Path(__file__).resolve().parent / "fetch_model.py"
OURS_NAMESPACE = "bento-demo"  # the example's own namespace, opted in
BASELINE_NAMESPACE = "bento-baseline"  # not opted in: nothing is injected
CONDITION = "juicefs.bentoml.com/models-ready"
VERSION_LABEL = "yatai.ai/bento-version"
REPOSITORY_LABEL = "yatai.ai/bento-repository"
PLAIN_PREFIX = "plain"
MODELS_PATH = "/home/bentoml/bento/models"
SHARDS = 4
CONNECTIONS = 16
# The warm target's margin over the baseline's pod start plus the app's start from local disk.
WARM_TARGET_FACTOR = 1.2
_READY_MESSAGE = re.compile(r"from the (?P<mode>\w+) cache")
_CACHE_FRACTION = re.compile(r"MiB \((?P<pct>[\d.]+)%\) from the node cache")
# The sample app's own line (examples/bento-app/service.py) once it has read
# and hashed every model file.
_APP_LOADED = re.compile(r"loaded \d+ model file\(s\), \d+ bytes, from \S+ in (?P<s>[\d.]+) s")
# A pod in node cache mode whose gate the node agent opened from its seal.
_SEALED = "sealed by the node agent"
# A Kubernetes label value (the Bento version is one): at most 63 characters.
_LABEL_VALUE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
LABEL_VALUE_MAX = 63

# Each repeat's figures, in the order of the record (the large model's with `_large`).
FIGURES = (
    "cold_start_s",
    "warm_start_s",
    "baseline_s",
    "cold_start_vs_limit",
    "cold_start_vs_baseline",
    "warm_vs_cold",
    "warm_start_target_s",
    "warm_start_vs_target",
    "pod_start_s",
    "app_local_start_s",
    "app_local_load_s",
    "app_cold_load_s",
    "app_warm_load_s",
    "node_cache_fraction",
    "cold_store_mib",
    "warm_store_mib",
    "baseline_store_mib",
)


# -- pure parts: names, figures, medians -------------------------------------


def sized(key: str, large: bool) -> str:
    """A record key for the small model (as is) or the large one (with `_large`)."""
    return f"{key}_large" if large else key


def bento_version(base: str, mib: int, repeat: int) -> str:
    """The Bento version a repeat publishes: new each time, so its blocks are new to the node.

    A label value (lower case here): `4fd7wxrbkcxfylg5-2048m-r0`.
    """
    version = f"{base}-{mib}m-r{repeat}".lower()
    if len(version) > LABEL_VALUE_MAX or not _LABEL_VALUE.fullmatch(version):
        raise ValueError(f"{version!r} is not a label value of at most {LABEL_VALUE_MAX} chars")
    return version


def median_of(values: Sequence[float | None]) -> float | None:
    """The median of the values measured (None ones left out); None if there is none."""
    found = [v for v in values if v is not None]
    return round(float(statistics.median(found)), 3) if found else None


def spread_of(values: Sequence[float | None]) -> list[float] | None:
    """[min, max] of the values measured (None ones left out); None if there is none."""
    found = [v for v in values if v is not None]
    return [min(found), max(found)] if found else None


def ratio(part: float | None, whole: float | None) -> float | None:
    if part is None or not whole:
        return None
    return round(part / whole, 3)


def cold_start_limit(model_bytes: int, raw_mib_per_s: float) -> float:
    """1.15 x the model's transfer time at the raw GET rate, plus 5 s."""
    return round(1.15 * model_bytes / (raw_mib_per_s * MIB) + 5, 2)


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
    load_avg: dict[str, float] = field(default_factory=dict)  # at the apply
    # Pages the kernel reclaimed in the processes' own allocations, apply to
    # Ready: CPU a start paid to a full page cache rather than to its model.
    direct_reclaim_mib: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 2),
            "milestones": {k: round(v, 2) for k, v in self.milestones.items()},
            "pod": self.pod,
            "events": self.events,
            "app_log": self.app_log,
            "store_mib": self.store_mib,
            "load_avg": self.load_avg,
            "direct_reclaim_mib": self.direct_reclaim_mib,
        }


PAGE = 4096
# JuiceFS stops caching when less than this share of the cache disk is free
# (its --free-space-ratio default); the node cache here is on the host's disk.
JUICEFS_FREE_RATIO = 0.1
# Copies of the largest model on disk at once: its source files, its blocks
# and the plain copy in MinIO, the node agent's local copy (cache.localCopy:
# the node's one copy, no node cache blocks beside it), the baseline's
# emptyDir.
COPIES_ON_DISK = 5


def disk_shortfall(free: int, total: int, largest_model: int) -> str | None:
    """Why the disk cannot hold a repeat of the largest model (None if it can).

    Short of room, the node agent's JuiceFS evicts the blocks it is warming
    and fetches them again: a cold start that measures the disk, not the link.
    """
    needed = COPIES_ON_DISK * largest_model + int(JUICEFS_FREE_RATIO * total)
    if free >= needed:
        return None
    return (
        f"{free / 2**30:.0f} GiB free, but a repeat of the {largest_model / 2**30:.0f} GiB model "
        f"needs {needed / 2**30:.0f} GiB ({COPIES_ON_DISK} copies on disk, and JuiceFS keeps "
        f"{JUICEFS_FREE_RATIO:.0%} of the disk free); free some, or lower --cold-large-mib"
    )


def direct_reclaim_pages(vmstat: str) -> int:
    """Pages reclaimed directly by allocating processes (/proc/vmstat's pgsteal_direct)."""
    for line in vmstat.splitlines():
        name, _, value = line.partition(" ")
        if name == "pgsteal_direct":
            return int(value)
    return 0


def models_ready(result: StartResult) -> str:
    """The sidecar's ModelsReady Event's message ("" without one)."""
    return next((e["message"] for e in result.events if e["reason"] == "ModelsReady"), "")


def node_mode(message: str) -> bool:
    """Whether a ModelsReady message says the pod read through the node cache."""
    match = _READY_MESSAGE.search(message)
    return _SEALED in message or (match is not None and match["mode"] == "node")


def node_cache_fraction(message: str) -> float | None:
    """The share of bytes from the node cache a ModelsReady message states."""
    if (found := _CACHE_FRACTION.search(message)) is not None:
        return float(found["pct"]) / 100
    # A seal checks that every block of the pod's files is in the node cache.
    return 1.0 if _SEALED in message else None


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


def app_local_start_seconds(baseline: StartResult) -> float | None:
    """The app container's whole start with its model on local disk (the baseline's
    emptyDir): `main running` to `main ready`, i.e. the process's imports, its
    load of the model (the app's own log figure, `app_load_seconds`) and its
    readiness probe passing."""
    m = baseline.milestones
    ready = m.get("main ready", m.get("Ready=True"))
    if "main running" not in m or ready is None:
        return None
    return round(ready - m["main running"], 2)


def warm_target_seconds(pod_start: float | None, app_local_start: float | None) -> float | None:
    """Issue 18's warm target: 1.2 x (pod start + the app's start from local disk).

    The app's start, not only its load (`app_local_load_s`, the app's own
    read-and-hash figure): apply to Ready also holds the app process's
    imports and its readiness probe, which no pod skips; a target without
    them could not be met by the baseline itself with a download of no time.
    """
    if pod_start is None or app_local_start is None:
        return None
    return round(WARM_TARGET_FACTOR * (pod_start + app_local_start), 2)


def repeat_figures(
    cold: StartResult, warm: StartResult | None, baseline: StartResult, limit_s: float
) -> dict[str, float | None]:
    """One repeat's figures (FIGURES), each against the same repeat's baseline and limit."""
    pod_start = pod_start_seconds(baseline)
    local_start = app_local_start_seconds(baseline)
    target = warm_target_seconds(pod_start, local_start)
    warm_s = None if warm is None else round(warm.seconds, 2)
    figures: dict[str, float | None] = {
        "cold_start_s": round(cold.seconds, 2),
        "warm_start_s": warm_s,
        "baseline_s": round(baseline.seconds, 2),
        "cold_start_vs_limit": ratio(cold.seconds, limit_s),
        "cold_start_vs_baseline": ratio(cold.seconds, baseline.seconds),
        "warm_vs_cold": ratio(warm_s, cold.seconds),
        "warm_start_target_s": target,
        "warm_start_vs_target": ratio(warm_s, target),
        "pod_start_s": pod_start,
        "app_local_start_s": local_start,
        "app_local_load_s": app_load_seconds(baseline),
        "app_cold_load_s": app_load_seconds(cold),
        "app_warm_load_s": None if warm is None else app_load_seconds(warm),
        "node_cache_fraction": None if warm is None else node_cache_fraction(models_ready(warm)),
        "cold_store_mib": cold.store_mib,
        "warm_store_mib": None if warm is None else warm.store_mib,
        "baseline_store_mib": baseline.store_mib,
    }
    assert tuple(figures) == FIGURES
    return figures


def summarize(
    per_repeat: Sequence[Mapping[str, float | None]], large: bool
) -> tuple[dict[str, float | None], dict[str, list[float]]]:
    """The median of each figure over the repeats, and its [min, max], under the sized keys.

    A ratio's median is the median of each repeat's own ratio (cold against
    the same repeat's baseline), not a ratio of the medians.
    """
    medians: dict[str, float | None] = {}
    spreads: dict[str, list[float]] = {}
    for name in FIGURES:
        values = [figures.get(name) for figures in per_repeat]
        medians[sized(name, large)] = median_of(values)
        if (spread := spread_of(values)) is not None:
            spreads[sized(name, large)] = spread
    return medians, spreads


def cached_copies(cache_root: Path, keys: Sequence[str]) -> list[Path]:
    """The node cache's copies of a model's blocks, given their object keys.

    `cache_root` is the node cache of one volume (`<cache.nodePath>/<volume>`);
    JuiceFS keeps a block of object `<volume>/chunks/...` under
    `<volume uuid>/raw/chunks/...` there (devcluster.storage.juicefs).
    """
    relative = [key.split("/", 1)[1] for key in keys if "/" in key]
    raws = sorted(p for p in cache_root.glob("*/raw") if p.is_dir())
    return [raw / rel for raw in raws for rel in relative if (raw / rel).is_file()]


# -- the cluster -------------------------------------------------------------


def example_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def deployment_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Deployment")


def example_identity() -> tuple[str, str, str]:
    """(deployment, bento repository, bento version) of the example."""
    deployment = deployment_of(example_docs())
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return deployment["metadata"]["name"], labels[REPOSITORY_LABEL], labels[VERSION_LABEL]


def ours_docs(version: str) -> list[dict[str, Any]]:
    """The example, one replica, its pod template naming this repeat's Bento version."""
    docs = example_docs()
    deployment = deployment_of(docs)
    deployment["spec"]["replicas"] = 1  # one GPU on the node
    deployment["spec"]["template"]["metadata"]["labels"][VERSION_LABEL] = version
    return docs


def plain_key(name: str, mib: int, path: str) -> str:
    """The baseline's copy of a model file: one per size, not per repeat. The baseline
    downloads it into a new emptyDir each time and no node-side cache is in its way
    (MinIO's page cache is filled before each run on purpose, as for ours)."""
    return f"{PLAIN_PREFIX}/{name}/{mib}m/models/{path}"


def fetch_spec(endpoint: str, bucket: str, files: Sequence[tuple[str, str, int]]) -> dict[str, Any]:
    """benchmarks/fetch_model.py's spec: (key, path, size) of each plain object to download."""
    return {
        "endpoint": endpoint,
        "bucket": bucket,
        "dest": "/models",
        "connections": CONNECTIONS,
        "range_bytes": 8 * MIB,
        "files": [{"key": key, "path": path, "size": size} for key, path, size in files],
    }


def baseline_docs(version: str, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The example not injected, in the baseline's namespace, one replica: an init container
    downloads the model (spec) into an emptyDir the app reads its models from."""
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
    template["metadata"]["labels"][VERSION_LABEL] = version
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


@dataclass
class Repeat:
    """One repeat at one size: its version, cold and warm (ours), baseline, and figures."""

    index: int
    version: str
    cached_before_cold: int
    cold: StartResult
    warm: StartResult | None
    baseline: StartResult
    figures: dict[str, float | None]
    publish_s: float
    cleanup_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "repeat": self.index,
            "version": self.version,
            "load_avg": self.cold.load_avg,  # at its cold start's apply
            "cached_before_cold": self.cached_before_cold,
            "publish_s": self.publish_s,
            "cleanup_s": self.cleanup_s,
            "figures": self.figures,
            "cold": self.cold.as_dict(),
            "warm": None if self.warm is None else self.warm.as_dict(),
            "baseline": self.baseline.as_dict(),
        }


@dataclass
class SizeRuns:
    """Every repeat at one model size, and the raw GET rate its limit is measured with."""

    mib: int
    large: bool
    model_bytes: int = 0
    files: tuple[ManifestFile, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)
    repeats: list[Repeat] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "large" if self.large else "small"

    @property
    def limit_s(self) -> float:
        return cold_start_limit(self.model_bytes, self.raw["mib_per_s"])

    def record(self) -> tuple[dict[str, Any], dict[str, list[float]]]:
        """The size's keys of a record (medians included), and the spreads."""
        bytes_ = self.model_bytes
        keys: dict[str, Any] = {
            "model_bytes": bytes_,
            "raw_mb_per_s": self.raw["mib_per_s"],  # MiB/s, as every rate here
            "raw": self.raw,
            "transfer_s": round(bytes_ / (self.raw["mib_per_s"] * MIB), 2),
            "cold_start_limit_s": self.limit_s,
        }
        medians, spreads = summarize([r.figures for r in self.repeats], self.large)
        return {sized(k, self.large): v for k, v in keys.items()} | medians, spreads


class Session:
    """The cluster, the shaped store and the runs at each size, shared by both scenarios."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.profile: LinkProfile = args.cold_profile
        self.cluster = ShapedCluster("bench-coldstart-", args.work_dir)
        self.tmp = self.cluster.work
        self.cp: ControlPlane = self.cluster.cp
        self.versions: dict[str, str] = {}
        self.load_at_start: dict[str, float] = {}
        self._runs: dict[bool, SizeRuns] = {}
        self._failed: dict[bool, str] = {}
        scenarios = getattr(args, "scenario", None)
        # The warm runs only when warm-start is among the scenarios (all when none is named).
        self.wants_warm = not scenarios or "warm-start" in scenarios

    # -- the cluster and its storage ----------------------------------------

    @property
    def storage(self) -> ShapedStorage:
        return self.cluster.storage

    def start(self) -> None:
        self.load_at_start = load()
        usage = shutil.disk_usage(self.tmp)
        largest = max(self.args.cold_size_mib, self.args.cold_large_mib) * MIB
        if (problem := disk_shortfall(usage.free, usage.total, largest)) is not None:
            raise RuntimeError(f"{self.tmp}: {problem}")
        say("cold-start", f"starting the local cluster in {self.tmp}")
        self.versions = self.cluster.start()
        self.cp.create_namespace(OURS_NAMESPACE, {"juicefs.bentoml.com/injection": "enabled"})
        self.cp.wait_provisioned(OURS_NAMESPACE)
        self.cp.create_namespace(BASELINE_NAMESPACE)
        self._allow_plain_reads()
        self.storage.shape(self.profile)

    def stop(self) -> None:
        self.cluster.stop()

    @contextmanager
    def _unshaped(self) -> Iterator[None]:
        """The link unshaped meanwhile (publishing, reading into MinIO's page cache)."""
        self.storage.shape(None)
        try:
            yield
        finally:
            self.storage.shape(self.profile)

    def _node_cache(self) -> Path:
        assert self.cp.node is not None
        return node_cache_dir(self.cp.node.dir) / self.storage.stack.volume_name

    # -- the runs ------------------------------------------------------------

    def sizes(self) -> list[bool]:
        """The sizes measured: the small model, and the large one unless its size is 0."""
        return [False, True] if self.args.cold_large_mib > 0 else [False]

    def runs(self, large: bool) -> SizeRuns:
        """Every repeat at one size, measured on first use: both scenarios read the same runs."""
        if large in self._failed:
            raise RuntimeError(f"the runs at this size failed earlier: {self._failed[large]}")
        if large not in self._runs:
            mib = self.args.cold_large_mib if large else self.args.cold_size_mib
            try:
                self._runs[large] = self._measure_size(SizeRuns(mib, large))
            except Exception as err:
                self._failed[large] = f"{type(err).__name__}: {err}"
                raise
        return self._runs[large]

    def all_runs(self) -> list[SizeRuns]:
        return [self.runs(large) for large in self.sizes()]

    def _measure_size(self, runs: SizeRuns) -> SizeRuns:
        """The source files written once, the plain copy uploaded once; then each repeat."""
        root = self.tmp / f"src-{runs.mib}m"
        say("cold-start", f"{runs.mib} MiB: writing the model's files ({SHARDS} shards)")
        try:
            source = write_random_model(root, [runs.mib * MIB // SHARDS] * SHARDS)
            for index in range(self.args.repeats):
                runs.repeats.append(self._repeat(runs, source, index))
            self._delete_plain(runs)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return runs

    def _repeat(self, runs: SizeRuns, source: Path, index: int) -> Repeat:
        _, name, base = example_identity()
        version = bento_version(base, runs.mib, index)
        what = f"{runs.mib} MiB, repeat {index + 1}/{self.args.repeats}"
        started = time.monotonic()
        store = self.storage.store
        with self._unshaped():
            manifest, keys = self._publish(source, name, version)
            if index == 0:
                runs.model_bytes, runs.files = manifest.total_bytes, manifest.files
                self._upload_plain(source, runs)
            read_objects(store.s3, store.bucket, keys, CONNECTIONS)  # into MinIO's page cache
        publish_s = round(time.monotonic() - started, 2)
        if index == 0:
            runs.raw = self._raw(keys)
        cached = len(cached_copies(self._node_cache(), keys))
        cold = self.apply_and_wait(
            OURS_NAMESPACE, ours_docs(version), f"{what}: cold start (injected, {version})"
        )
        warm = None
        if self.wants_warm and node_mode(models_ready(cold)):
            self._forget_harness_pages(source)
            warm = self.apply_and_wait(
                OURS_NAMESPACE, ours_docs(version), f"{what}: warm start (the same node)"
            )
        started = time.monotonic()
        self._drop_version(name, version, keys)
        cleanup_s = round(time.monotonic() - started, 2)
        with self._unshaped():  # the baseline's objects into MinIO's page cache, as ours were
            read_objects(store.s3, store.bucket, self._plain(runs), CONNECTIONS)
        baseline = self.apply_and_wait(
            BASELINE_NAMESPACE,
            baseline_docs(version, self._fetch_spec(runs)),
            f"{what}: baseline (download, then start)",
        )
        figures = repeat_figures(cold, warm, baseline, runs.limit_s)
        return Repeat(index, version, cached, cold, warm, baseline, figures, publish_s, cleanup_s)

    def _forget_harness_pages(self, source: Path) -> None:
        """Drop the page cache of what only the harness holds on this machine: the model's
        source files, MinIO's data and the JuiceFS writer's cache.

        A real node holds none of them (its object store is elsewhere); here
        they are three more copies of the model in the same 23 GiB, and at
        8 GiB they crowd the node's own copy out of memory before the warm
        start. The node, its agent and the pods are left as they are.
        """
        stack = self.storage.stack
        dirs = [source, stack.store.data_dir, stack.work_dir / "writer-cache"]
        dropped = sum(advise_files(d, os.POSIX_FADV_DONTNEED) for d in dirs)
        say("cold-start", f"dropped {dropped / MIB:.0f} MiB of the harness's own page cache")

    def _publish(self, source: Path, name: str, version: str) -> tuple[Manifest, list[str]]:
        """The files as a new Bento version (new blocks); its manifest and block keys."""
        stack = self.storage.stack
        manifest = publish(source, stack.writer_mount, PATH_TEMPLATE, name, version)
        keys = stack.block_keys(manifest, name, version)
        say(
            "cold-start",
            f"published {name}:{version}, {manifest.total_bytes / MIB:.0f} MiB "
            f"({len(keys)} blocks)",
        )
        return manifest, keys

    def _raw(self, keys: list[str]) -> dict[str, Any]:
        """Parallel GETs of the model's blocks over the shaped link (from MinIO's page cache)."""
        store = self.storage.store
        result = read_objects(store.s3, store.bucket, keys, CONNECTIONS)
        say("cold-start", f"raw {result.mb_per_s:.0f} MiB/s under {self.profile.name}")
        return {
            "mib_per_s": round(result.mb_per_s, 1),
            "bytes": result.bytes,
            "seconds": round(result.seconds, 2),
            "connections": CONNECTIONS,
            "path": "host link (the node link has the same qdisc)",
        }

    def _drop_version(self, name: str, version: str, keys: list[str]) -> None:
        """The version's files, objects and node-cache blocks gone, before the next repeat.

        Removed through the writer mount: the volume is formatted with
        `--trash-days 0` (devcluster.storage.juicefs.JuiceFSVolume.format), so
        the writer's client deletes a removed file's objects at once instead
        of keeping them in a trash; this waits until MinIO lists none of them.
        The node cache keeps its copies of deleted blocks (no client there
        deletes them, and the node agent evicts only what it can still read a
        manifest of): they are removed here, from the node's disk, with no pod
        running, and so is the agent's local copy of the version. The node
        agent's record of the version stays on the Node.
        """
        stack, store = self.storage.stack, self.storage.store
        shutil.rmtree(stack.bento_dir(name, version))
        cached = cached_copies(self._node_cache(), keys)
        for path in cached:
            path.unlink(missing_ok=True)
        # And the node agent's verified local copy of the version (cache.localCopy).
        volume = self.storage.stack.volume_name
        shutil.rmtree(
            self._node_cache().parent / LOCAL_COPIES_DIR / volume / name / version,
            ignore_errors=True,
        )
        wanted = set(keys)
        deadline = time.monotonic() + 300
        left = wanted
        while left and time.monotonic() < deadline:
            time.sleep(1)
            left = wanted & set(store.s3.list_objects(store.bucket, f"{stack.volume_name}/chunks/"))
        say(
            "cold-start",
            f"removed {name}:{version}: {len(cached)} blocks from the node cache, "
            f"{len(wanted) - len(left)} of {len(wanted)} objects from MinIO",
        )

    # -- the baseline's plain copy ----------------------------------------------

    def _plain(self, runs: SizeRuns) -> list[str]:
        _, name, _ = example_identity()
        return [plain_key(name, runs.mib, f.path) for f in runs.files]

    def _fetch_spec(self, runs: SizeRuns) -> dict[str, Any]:
        store = self.storage.store
        files = [
            (key, f.path, f.size) for f, key in zip(runs.files, self._plain(runs), strict=True)
        ]
        return fetch_spec(store.endpoint, store.bucket, files)

    def _upload_plain(self, source: Path, runs: SizeRuns) -> None:
        """The same files as plain objects, readable without keys (the baseline's copy)."""
        store = self.storage.store
        for entry, key in zip(runs.files, self._plain(runs), strict=True):
            store.s3.put_object(store.bucket, key, (source / entry.path).read_bytes())

    def _delete_plain(self, runs: SizeRuns) -> None:
        store = self.storage.store
        for key in self._plain(runs):
            store.s3.delete_object(store.bucket, key)

    def _allow_plain_reads(self) -> None:
        store = self.storage.store
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

    # -- one start -----------------------------------------------------------

    def apply_and_wait(self, namespace: str, docs: list[dict[str, Any]], what: str) -> StartResult:
        cp = self.cp
        deployment = deployment_of(docs)
        name = deployment["metadata"]["name"]
        text = yaml.safe_dump_all(docs)
        served_before = store_requests(self.storage.store)
        reclaimed_before = direct_reclaim_pages(Path("/proc/vmstat").read_text())
        load_avg = load()
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
        result = StartResult(seen["Ready=True"], seen, pod_name, load_avg=load_avg)
        served = store_requests(self.storage.store) - served_before
        result.store_mib = round(served.bytes_sent / MIB, 1)
        reclaimed = direct_reclaim_pages(Path("/proc/vmstat").read_text()) - reclaimed_before
        result.direct_reclaim_mib = round(reclaimed * PAGE / MIB, 1)
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
            f"{what}: Ready {result.seconds:.1f}s after apply (load {load_avg['1m']}), the "
            f"store serving {result.store_mib} MiB ({seen})",
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


# -- the records -------------------------------------------------------------


def _record(s: Session, scenario: str) -> dict[str, Any]:
    """Both scenarios' record: every figure at each size, from the session's one set of runs."""
    sizes = s.all_runs()
    record = new_record(
        scenario,
        {
            "model_mib": s.args.cold_size_mib,
            "large_mib": s.args.cold_large_mib,
            "repeats": s.args.repeats,
            "shards": SHARDS,
            "profile": {"mb_per_s": s.profile.mb_per_s, "delay_ms": s.profile.delay_ms},
            "deployment": str(EXAMPLE.relative_to(REPO)) + " with replicas: 1",
            "node": "the local real node (containerd + kubelet), its pods reach MinIO over a "
            "veth to the store's netns with the same tbf as the host link",
            "cold": "each repeat a new Bento version of the same files: new JuiceFS blocks, "
            "none of them in the node cache; raw measured on each size's first repeat",
        },
    )
    # new_record's load_before is now, after the runs: the session's start is before them.
    record["load_before"] = s.load_at_start
    record["versions"] = s.versions
    record["repeats"] = s.args.repeats
    record["spread"] = {}
    record["runs"] = {}
    for runs in sizes:
        keys, spreads = runs.record()
        record.update(keys)
        record["spread"].update(spreads)
        record["runs"][runs.name] = [r.as_dict() for r in runs.repeats]
    return record


def run_cold(args: argparse.Namespace, shared: SharedSession) -> dict[str, Any]:
    s = shared.get(args)
    record = _record(s, "cold-start")
    for runs in s.all_runs():
        record[sized("models_ready_event", runs.large)] = models_ready(runs.repeats[0].cold)
    return record


def run_warm(args: argparse.Namespace, shared: SharedSession) -> dict[str, Any]:
    s = shared.get(args)
    record = _record(s, "warm-start")
    message = models_ready(s.runs(False).repeats[0].cold)
    if not node_mode(message):
        record["node_cache"] = (
            "not there yet: the sidecar's ModelsReady Event names no node cache "
            f"({message!r}); warm start needs cache mode `node` (issue 7)"
        )
        return record
    for runs in s.all_runs():
        warm = runs.repeats[0].warm
        record[sized("models_ready_event", runs.large)] = "" if warm is None else models_ready(warm)
    return record


# -- the table ---------------------------------------------------------------


def _num(value: float | None, unit: str = " s", fmt: str = "g") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{unit}"


def _spread(record: Mapping[str, Any], key: str, unit: str = " s") -> str:
    found = record.get("spread", {}).get(key)
    if not found:
        return "no runs"
    return f"{record['repeats']} runs {found[0]:g}-{found[1]:g}{unit}"


def _size_rows(record: Mapping[str, Any], large: bool) -> list[tuple[str, str, str]]:
    def k(name: str) -> str:
        return sized(name, large)

    mib = record[k("model_bytes")] / MIB
    cap = record["settings"]["profile"]["mb_per_s"]
    limit = record[k("cold_start_limit_s")]
    rows = [
        (
            f"{mib:.0f} MiB: raw GETs under {cap:g} MB/s cap",
            f"{record[k('raw_mb_per_s')]} MiB/s",
            f"in {record[k('transfer_s')]} s; limit 1.15x + 5 s = {limit} s",
        )
    ]
    if record["scenario"] == "cold-start":
        return [*rows, *_cold_rows(record, large, mib)]
    return [*rows, *_warm_rows(record, large, mib)]


def _cold_rows(record: Mapping[str, Any], large: bool, mib: float) -> list[tuple[str, str, str]]:
    def k(name: str) -> str:
        return sized(name, large)

    return [
        (
            f"{mib:.0f} MiB: cold start, apply to Ready (injected)",
            _num(record[k("cold_start_s")]),
            f"{_num(record[k('cold_start_vs_limit')], 'x', '.2f')} the limit; "
            f"{_spread(record, k('cold_start_s'))}",
        ),
        (
            f"{mib:.0f} MiB: baseline: download whole model, then start",
            _num(record[k("baseline_s")]),
            f"ours is {_num(record[k('cold_start_vs_baseline')], 'x', '.2f')} of it; "
            f"{_spread(record, k('baseline_s'))}",
        ),
        (
            f"{mib:.0f} MiB: the app's own load: cold (ours), local emptyDir (baseline)",
            _num(record[k("app_cold_load_s")]),
            f"{_spread(record, k('app_cold_load_s'))}; local {_num(record[k('app_local_load_s')])}"
            f" ({_spread(record, k('app_local_load_s'))})",
        ),
        (
            f"{mib:.0f} MiB: pod start; the app's start from local disk (baseline)",
            _num(record[k("pod_start_s")]),
            f"{_spread(record, k('pod_start_s'))}; app start "
            f"{_num(record[k('app_local_start_s')])} ({_spread(record, k('app_local_start_s'))})",
        ),
    ]


def _warm_rows(record: Mapping[str, Any], large: bool, mib: float) -> list[tuple[str, str, str]]:
    def k(name: str) -> str:
        return sized(name, large)

    if record.get("node_cache") is not None:
        return [(f"{mib:.0f} MiB: warm start", "n/a", record["node_cache"])]
    fraction = record[k("node_cache_fraction")]
    return [
        (
            f"{mib:.0f} MiB: warm start, apply to Ready on a warm node",
            _num(record[k("warm_start_s")]),
            f"{_num(record[k('warm_vs_cold')], 'x', '.2f')} cold "
            f"({_num(record[k('cold_start_s')])}); "
            f"{_num(fraction, '', '.1%')} of bytes from the node cache; "
            f"{_spread(record, k('warm_start_s'))}",
        ),
        (
            f"{mib:.0f} MiB: target 1.2 x (pod start + the app's start from local disk)",
            _num(record[k("warm_start_target_s")]),
            f"warm is {_num(record[k('warm_start_vs_target')], 'x', '.2f')} the target "
            f"({_spread(record, k('warm_start_vs_target'), 'x')}); target "
            f"{_spread(record, k('warm_start_target_s'))}; the app's warm load "
            f"{_num(record[k('app_warm_load_s')])}, local {_num(record[k('app_local_load_s')])}",
        ),
    ]


def table(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Medians of the repeats, each with its spread (min-max), for each size."""
    rows = _size_rows(record, False)
    if sized("model_bytes", True) in record:
        rows.extend(_size_rows(record, True))
    return rows
