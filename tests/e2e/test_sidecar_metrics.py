"""The sidecar's own Prometheus metrics, scraped from the host at real Bento pods' IPs.

Two pods of one Bento run to Ready, one after the other: the first with a
pod cache, whose sidecar streams the model from the object store and
verifies it itself; the second in node cache mode, whose gate the node
agent opens from its seal (it warms and verifies the Bento once for the
node), so its sidecar hashes nothing. Each pod's `juicefs-mount` serves
/metrics on its container port `metrics` (sidecar.metricsPort), at the
pod's IP, which the host routes to, as Prometheus would reach it: the
streamed pod's verified bytes are the published model's, from the object
store; both say ready, with their time to ready.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devcluster import Cluster
from devcluster.images import SAMPLE_BENTO_IMAGE
from devcluster.node import Node
from devcluster.storage import MIB, StorageStack
from modelstore.manifest import Manifest
from tests.e2e.pods import (
    SIDECAR,
    bento_labels,
    diagnose,
    get_pod,
    is_ready,
    opted_in_namespace,
    wait_pod,
)

BENTO, VERSION = "sidecar-metrics", "v1"
PREFIX = "bento_juicefs_sidecar_"


@pytest.fixture(scope="module")
def model(storage: StorageStack, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return storage.publish_random(
        tmp_path_factory.mktemp("metrics"), BENTO, VERSION, [24 * MIB] * 2
    )


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    with opted_in_namespace(cluster, "e2e-metrics") as name:
        yield name


def bento_pod(name: str, cache_mode: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": bento_labels(BENTO, VERSION),
            "annotations": {"juicefs.bentoml.com/cache-mode": cache_mode},
        },
        "spec": {
            "terminationGracePeriodSeconds": 20,
            "containers": [
                {
                    "name": "main",
                    "image": SAMPLE_BENTO_IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", "exec sleep 3600"],
                }
            ],
        },
    }


Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass
class Scraped:
    """One pod once Ready, and its sidecar's /metrics as scraped from the host."""

    name: str
    seconds_to_ready: float  # kubectl apply to Ready, seen by polling
    samples: Samples

    def value(self, name: str, **labels: str) -> float:
        for found, value in self.samples.get(PREFIX + name, []):
            if all(found.get(k) == v for k, v in labels.items()):
                return value
        raise AssertionError(f"{self.name}: no {PREFIX}{name}{labels} in {sorted(self.samples)}")


def metrics_port(pod: dict[str, Any]) -> int:
    """The sidecar's container port `metrics`, as a PodMonitor selects it."""
    spec = pod["spec"]
    (sidecar,) = [c for c in spec.get("initContainers", []) if c["name"] == SIDECAR]
    (port,) = [p["containerPort"] for p in sidecar.get("ports", []) if p["name"] == "metrics"]
    return int(port)


def scrape(ip: str, port: int) -> Samples:
    with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def run_and_scrape(cluster: Cluster, namespace: str, name: str, cache_mode: str) -> Scraped:
    started = time.monotonic()
    pod = bento_pod(name, cache_mode)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    ready = wait_pod(cluster, namespace, name, is_ready, timeout=240, what=f"pod {name} Ready")
    seconds = time.monotonic() - started
    ip, port = ready["status"]["podIP"], metrics_port(ready)
    try:
        samples = scrape(ip, port)
    except OSError as err:
        raise AssertionError(
            f"scraping http://{ip}:{port}/metrics: {err}\n{diagnose(cluster, namespace, name)}"
        ) from err
    return Scraped(name, seconds, samples)


@pytest.fixture(scope="module")
def started(cluster: Cluster, node: Node, namespace: str, model: Manifest) -> dict[str, Scraped]:
    """The streamed pod (pod cache), then the sealed one (node cache), each scraped once Ready."""
    pods = {
        "streamed": run_and_scrape(cluster, namespace, "streamed", "pod"),
        "sealed": run_and_scrape(cluster, namespace, "sealed", "node"),
    }
    streamed = pods["streamed"]
    print(
        f"streamed: Ready {streamed.seconds_to_ready:.1f}s after kubectl apply; sidecar "
        f"time_to_ready {streamed.value('time_to_ready_seconds'):.1f}s, stream "
        f"{streamed.value('stream_duration_seconds'):.2f}s at "
        f"{streamed.value('stream_bytes_per_second') / MIB:.0f} MiB/s; "
        f"{streamed.value('cache_bytes_total') / MIB:.0f} MiB from the cache, "
        f"{streamed.value('store_bytes_total') / MIB:.0f} MiB from the object store"
    )
    sealed = pods["sealed"]
    print(
        f"sealed: Ready {sealed.seconds_to_ready:.1f}s after kubectl apply; sidecar "
        f"time_to_ready {sealed.value('time_to_ready_seconds'):.1f}s (the agent warmed it)"
    )
    return pods


def test_both_sidecars_say_they_are_ready_without_failures(started: dict[str, Scraped]) -> None:
    for mode, pod in (("pod", started["streamed"]), ("node", started["sealed"])):
        assert pod.value("state", state="ready") == 1, pod.name
        for state in ("starting", "streaming", "failed"):
            assert pod.value("state", state=state) == 0, (pod.name, state)
        for reason in ("VerificationFailed", "WarmupTimedOut", "WarmupFailed"):
            assert pod.value("warmup_failures_total", reason=reason) == 0, (pod.name, reason)
        info = {"bento": BENTO, "version": VERSION, "volume": "models", "cache_mode": mode}
        assert pod.value("info", **info) == 1, pod.name


def test_the_streaming_sidecar_verified_the_model_from_the_store(
    started: dict[str, Scraped], model: Manifest
) -> None:
    pod = started["streamed"]
    assert pod.value("verified_bytes_total") == model.total_bytes
    assert pod.value("streamed_bytes_total") == model.total_bytes
    assert pod.value("model_bytes") == model.total_bytes
    split = pod.value("cache_bytes_total") + pod.value("store_bytes_total")
    assert split == model.total_bytes
    assert pod.value("store_bytes_total") >= 0.95 * model.total_bytes  # its cache was empty


def test_the_sealed_sidecar_hashed_nothing(started: dict[str, Scraped]) -> None:
    """The node agent verified the Bento for the node; this sidecar read no model byte."""
    pod = started["sealed"]
    assert pod.value("verified_bytes_total") == 0
    assert pod.value("streamed_bytes_total") == 0


def test_time_to_ready_is_within_the_pods_start(started: dict[str, Scraped]) -> None:
    for pod in started.values():
        seconds = pod.value("time_to_ready_seconds")
        # The sidecar starts after the pod is created and sets the condition
        # before the kubelet marks the pod Ready.
        assert 0 < seconds <= pod.seconds_to_ready, (pod.name, seconds, pod.seconds_to_ready)
    streamed = started["streamed"]
    assert 0 < streamed.value("stream_duration_seconds") < streamed.value("time_to_ready_seconds")
    assert streamed.value("stream_bytes_per_second") > 0


def test_the_metrics_port_is_the_configured_one(cluster: Cluster, namespace: str) -> None:
    pod = get_pod(cluster, namespace, "streamed")
    env = {
        e["name"]: e.get("value")
        for c in pod["spec"]["initContainers"]
        if c["name"] == SIDECAR
        for e in c["env"]
    }
    assert env["JFS_METRICS_PORT"] == str(metrics_port(pod))
