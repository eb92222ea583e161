"""The sidecar's own Prometheus metrics, scraped from the host at real Bento pods' IPs.

Two pods of one Bento run to Ready, one after the other, on the local node's
shared node cache: the first fetches the model from the object store, the
second reads it from the cache the first filled. Each pod's `juicefs-mount`
serves /metrics on its container port `metrics` (sidecar.metricsPort), at
the pod's IP, which the host routes to, as Prometheus would reach it: the
verified bytes are the published model's, split between the cache and the
object store as the two starts say, with the time to ready and the state.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devcluster import Cluster
from devcluster.images import SAMPLE_BENTO_IMAGE
from devcluster.node import Node
from devcluster.storage import MIB, StorageStack
from sidecar.manifest import Manifest
from tests.e2e.pods import SIDECAR, diagnose, get_pod, is_ready, wait_pod

BENTO, VERSION = "sidecar-metrics", "v1"
OPT_IN = {"juicefs.bentoml.com/injection": "enabled"}
PREFIX = "bento_juicefs_sidecar_"


@pytest.fixture(scope="module")
def model(storage: StorageStack, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return storage.publish_random(
        tmp_path_factory.mktemp("metrics"), BENTO, VERSION, [24 * MIB] * 2
    )


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"e2e-metrics-{uuid.uuid4().hex[:6]}"
    cluster.create_namespace(name, OPT_IN)
    cluster.wait_provisioned(name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def bento_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                "juicefs.bentoml.com/model-store": "juicefs",
                "yatai.ai/bento-repository": BENTO,
                "yatai.ai/bento-version": VERSION,
            },
            # The node's shared cache: the second pod reads what the first fetched.
            "annotations": {"juicefs.bentoml.com/cache-mode": "node"},
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


def run_and_scrape(cluster: Cluster, namespace: str, name: str) -> Scraped:
    started = time.monotonic()
    pod = bento_pod(name)
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
def started(cluster: Cluster, node: Node, namespace: str, model: Manifest) -> list[Scraped]:
    """The first pod (cold), then the second (warm from the node cache), each scraped once Ready."""
    pods = [run_and_scrape(cluster, namespace, name) for name in ("cold", "warm")]
    for pod in pods:
        print(
            f"{pod.name}: Ready {pod.seconds_to_ready:.1f}s after kubectl apply; sidecar "
            f"time_to_ready {pod.value('time_to_ready_seconds'):.1f}s, stream "
            f"{pod.value('stream_duration_seconds'):.2f}s at "
            f"{pod.value('stream_bytes_per_second') / MIB:.0f} MiB/s; "
            f"{pod.value('cache_bytes_total') / MIB:.0f} MiB from the cache, "
            f"{pod.value('store_bytes_total') / MIB:.0f} MiB from the object store"
        )
    return pods


def test_the_sidecar_says_it_verified_the_model_and_is_ready(
    started: list[Scraped], model: Manifest
) -> None:
    for pod in started:
        assert pod.value("verified_bytes_total") == model.total_bytes, pod.name
        assert pod.value("streamed_bytes_total") == model.total_bytes, pod.name
        assert pod.value("model_bytes") == model.total_bytes, pod.name
        assert pod.value("state", state="ready") == 1, pod.name
        for state in ("starting", "streaming", "failed"):
            assert pod.value("state", state=state) == 0, (pod.name, state)
        for reason in ("VerificationFailed", "WarmupTimedOut", "WarmupFailed"):
            assert pod.value("warmup_failures_total", reason=reason) == 0, (pod.name, reason)
        info = {"bento": BENTO, "version": VERSION, "volume": "models", "cache_mode": "node"}
        assert pod.value("info", **info) == 1, pod.name


def test_time_to_ready_is_within_the_pods_start(started: list[Scraped]) -> None:
    for pod in started:
        seconds = pod.value("time_to_ready_seconds")
        # The sidecar starts after the pod is created and sets the condition
        # before the kubelet marks the pod Ready.
        assert 0 < seconds <= pod.seconds_to_ready, (pod.name, seconds, pod.seconds_to_ready)
        assert 0 < pod.value("stream_duration_seconds") < seconds, pod.name
        assert pod.value("stream_bytes_per_second") > 0, pod.name


def test_the_bytes_came_from_the_store_then_from_the_node_cache(
    started: list[Scraped], model: Manifest
) -> None:
    cold, warm = started
    for pod in started:
        split = pod.value("cache_bytes_total") + pod.value("store_bytes_total")
        assert split == model.total_bytes, pod.name
    # As tests/e2e/test_node_cache.py holds the ModelsReady Events to.
    assert cold.value("cache_bytes_total") <= 0.05 * model.total_bytes
    assert warm.value("cache_bytes_total") >= 0.95 * model.total_bytes


def test_the_metrics_port_is_the_configured_one(cluster: Cluster, namespace: str) -> None:
    pod = get_pod(cluster, namespace, "cold")
    env = {
        e["name"]: e.get("value")
        for c in pod["spec"]["initContainers"]
        if c["name"] == SIDECAR
        for e in c["env"]
    }
    assert env["JFS_METRICS_PORT"] == str(metrics_port(pod))
