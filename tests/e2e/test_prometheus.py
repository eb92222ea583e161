"""A real Prometheus scrapes the local cluster as the chart's monitors say, and runs the
dashboard's queries and the alert rules on what it scraped.

Prometheus 3.16 (built from its Go module like promtool) runs on the host, which
routes to the pods' IPs as a cluster's Prometheus reaches them. Its jobs:
- the chart's two PodMonitors, as the Prometheus Operator would make them
  (tests/kit/prometheus.py): every JuiceFS Bento pod's `juicefs-mount` port
  `metrics`, and every node agent's;
- the injector's /metrics over HTTPS, verified against the CA the webhook
  trusts (what the chart's ServiceMonitor does);
- the apiserver's /metrics, for the dashboard's admission panels.
It loads the chart's PrometheusRule groups as its rule file.

A Bento pod streams its model and turns Ready first. Then:
- every job has its targets up, labelled as the queries join them;
- the pod's juicefs metrics come from the pod's IP, through the sidecar's relay,
  and the stock JuiceFS dashboard's kind of query reads them;
- every query of the chart's Grafana dashboard runs without error or warning, and
  all but the few that count rare things (denials, firing alerts) return series;
- every alert rule evaluates without error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.processes import log_tail
from devcluster import Cluster, ControlPlane, wait_for
from devcluster.installs.injector_install import InjectorInstall
from devcluster.node.node import Node
from devcluster.storage.stack import MIB, StorageStack
from modelstore.manifest import Manifest
from tests.e2e.pods import (
    bento_labels,
    checking_pod,
    create_pod,
    is_ready,
    opted_in_namespace,
    wait_pod,
)
from tests.kit.chart import NAMESPACE, helm
from tests.kit.dashboard import dashboard, queries
from tests.kit.prometheus import Prometheus, pod_monitor_job

BENTO, VERSION = "prom-bento", "v1"
INTERVAL = "2s"
RATE = "30s"  # $__rate_interval: several scrapes at INTERVAL
SIDECAR_MONITOR = ("PodMonitor", "bento-juicefs-sidecars", NAMESPACE)
AGENT_MONITOR = ("PodMonitor", "bento-juicefs-node-agent", NAMESPACE)
RULE = ("PrometheusRule", "bento-juicefs", NAMESPACE)
MONITORS_ON = (
    "metrics.podMonitor.enabled=true",
    "metrics.sidecarPodMonitor.enabled=true",
    "metrics.prometheusRule.enabled=true",
)

# Dashboard panels that may rightly show nothing here: what they count did not
# happen (a policy denial, a fail-open call, a firing alert), or is over (the
# progress of pods still streaming: the pod is Ready).
RARE = {
    "panel 'Admission policy denials' A",
    "panel 'Streaming progress' A",
    "panel 'Alerts firing' A",
    "panel 'Webhook fail-open and rejections' A",
    "panel 'Webhook fail-open and rejections' B",
}


@pytest.fixture(scope="module")
def model(storage: StorageStack, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return storage.publish_random(tmp_path_factory.mktemp("prom"), BENTO, VERSION, [16 * MIB] * 2)


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    with opted_in_namespace(cluster, "prom") as name:
        yield name


@pytest.fixture(scope="module")
def ready_pod(cluster: Cluster, node: Node, namespace: str, model: Manifest) -> str:
    """A Bento pod that streamed its model and turned Ready, on a cache of its own:
    its juicefs runs in the pod (a pod the node agent serves from the node's
    verified copy runs none, so relays none)."""
    shard = max(model.files, key=lambda f: f.size)
    pod = checking_pod(
        "streamed",
        bento_labels(BENTO, VERSION),
        shard.path,
        shard.sha256,
        annotations={"juicefs.bentoml.com/cache-mode": "pod"},
    )
    create_pod(cluster, namespace, pod)
    wait_pod(cluster, namespace, "streamed", is_ready, timeout=120, what="pod streamed Ready")
    return "streamed"


def injector_job(injector: InjectorInstall, directory: Path) -> dict[str, Any]:
    """What the chart's ServiceMonitor asks: HTTPS on the webhook port, the webhook's CA."""
    ca = directory / "injector-ca.crt"
    ca.write_bytes(injector.ca_certificate())
    return {
        "job_name": "serviceMonitor/bento-juicefs-system/bento-juicefs-injector/0",
        "scheme": "https",
        "tls_config": {"ca_file": str(ca), "server_name": injector.server_name},
        "static_configs": [
            {
                "targets": injector.endpoints(),
                "labels": {"namespace": NAMESPACE, "job": "bento-juicefs-injector"},
            }
        ],
    }


def apiserver_job(cluster: ControlPlane) -> dict[str, Any]:
    """The apiserver's /metrics with the admin's client certificate."""
    pki = cluster.pki
    return {
        "job_name": "apiserver",
        "scheme": "https",
        "tls_config": {
            "ca_file": str(pki.ca.cert),
            "cert_file": str(pki.admin.cert),
            "key_file": str(pki.admin.key),
        },
        "static_configs": [{"targets": [cluster.server.removeprefix("https://")]}],
    }


@pytest.fixture(scope="module")
def prometheus(
    cluster: Cluster,
    injector: InjectorInstall,
    namespace: str,
    ready_pod: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Prometheus]:
    if not isinstance(cluster, ControlPlane):
        pytest.skip("needs the local cluster: a Prometheus on this machine scrapes pod IPs")
    directory = tmp_path_factory.mktemp("prometheus")
    objects = helm(*MONITORS_ON)
    jobs = [
        pod_monitor_job(objects[SIDECAR_MONITOR], cluster.kubeconfig, INTERVAL),
        pod_monitor_job(objects[AGENT_MONITOR], cluster.kubeconfig, INTERVAL),
        injector_job(injector, directory),
        apiserver_job(cluster),
    ]
    server = Prometheus(directory, jobs, objects[RULE]["spec"]["groups"], INTERVAL)
    server.start()
    try:
        wait_for(
            lambda: every_job_up(server, namespace, ready_pod),
            timeout=90,
            what=f"a target up for every job:\n{log_tail(server.log)}",
        )
        # Enough scrapes for a rate over RATE, and a few rule evaluations.
        wait_for(lambda: scrapes(server) >= 8, timeout=60, what="8 scrapes")
        yield server
    finally:
        server.stop()


def every_job_up(server: Prometheus, namespace: str, pod: str) -> bool:
    """Each job has a target up: the pod's sidecar, an agent, the injector, the apiserver.

    Not every target: pods of other tests in the session may be on their way out.
    """
    up = [t for t in server.targets() if t["health"] == "up"]
    jobs = {t["scrapePool"] for t in up}
    ours = any(
        t["labels"].get("namespace") == namespace and t["labels"].get("pod") == pod for t in up
    )
    return len(jobs) == 4 and ours


def scrapes(server: Prometheus) -> int:
    answer = server.query('count_over_time(up{job="apiserver"}[1m])')
    return int(float(answer["data"]["result"][0]["value"][1])) if answer["data"]["result"] else 0


def series(server: Prometheus, expr: str) -> list[dict[str, Any]]:
    answer = server.query(expr)
    assert answer["status"] == "success", f"{expr}: {answer}"
    assert not answer.get("warnings"), f"{expr}: {answer['warnings']}"
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def test_every_monitor_s_targets_are_up_and_labelled_for_the_joins(
    prometheus: Prometheus, namespace: str, ready_pod: str
) -> None:
    targets = prometheus.targets()
    print(json.dumps({t["scrapePool"]: t["health"] for t in targets}))
    sidecars = [
        t["labels"]
        for t in targets
        if t["scrapePool"].endswith("bento-juicefs-sidecars/0")
        and t["labels"].get("namespace") == namespace
    ]
    assert [s["pod"] for s in sidecars] == [ready_pod]
    (sidecar,) = sidecars
    assert sidecar["container"] == "juicefs-mount"
    assert sidecar["job"] == "bento-juicefs-system/bento-juicefs-sidecars"
    assert sidecar["node"]
    agents = [t["labels"] for t in targets if t["scrapePool"].endswith("node-agent/0")]
    assert agents
    assert all(a["node"] for a in agents)


def test_the_pod_s_juicefs_metrics_come_from_its_ip_as_juicefs_names_them(
    prometheus: Prometheus, storage: StorageStack, namespace: str, ready_pod: str
) -> None:
    volume = storage.volume_name
    pod = f'namespace="{namespace}", pod="{ready_pod}"'
    (uptime,) = series(prometheus, f"juicefs_uptime{{{pod}}}")
    assert uptime["metric"]["vol_name"] == volume
    assert uptime["metric"]["mp"]
    # The stock JuiceFS dashboard's kind of query: by volume, per instance.
    on_volume = f'vol_name="{volume}"'
    for expr in (
        f"count(juicefs_uptime{{{on_volume}}})",
        f"sum(rate(juicefs_transaction_durations_histogram_seconds_count{{{on_volume}}}[1m]))"
        " by (instance)",
        f"sum(increase(juicefs_fuse_read_size_bytes_sum{{{on_volume}}}[5m])) by (instance)",
        f"sum(rate(juicefs_fuse_ops_durations_histogram_seconds_count{{{on_volume}}}[1m]))"
        " by (instance)",
        f"sum(juicefs_object_request_data_bytes{{{on_volume}}}) by (instance, method)",
        f"sum(juicefs_blockcache_bytes{{{on_volume}}}) by (instance)",
    ):
        assert series(prometheus, expr), expr
    # What the pod read through FUSE: at least the model file its app checked.
    (read,) = series(prometheus, f"juicefs_fuse_read_size_bytes_sum{{{pod}}}")
    assert float(read["value"][1]) >= 16 * MIB


def grafana_variables(expr: str) -> str:
    """The dashboard's variables as Grafana fills them with "All" selected."""
    for variable, value in (
        ("$__rate_interval", RATE),
        ("$__range", "5m"),
        ("$namespace", ".*"),
        ("$bento", ".*"),
    ):
        expr = expr.replace(variable, value)
    return expr


def test_every_dashboard_query_runs_and_the_panels_show_series(prometheus: Prometheus) -> None:
    empty = []
    for where, expr in queries(dashboard()):
        if where.startswith("variable"):
            expr = f"group by (namespace) ({expr})"  # label_values(metric, ...): its metric
        found = series(prometheus, grafana_variables(expr))
        if not found and where not in RARE:
            empty.append(where)
    assert not empty, f"panels with no series: {empty}"


def test_every_alert_rule_evaluates_without_error(prometheus: Prometheus) -> None:
    rules = prometheus.rules()
    assert rules
    wait_for(
        lambda: all(r.get("lastEvaluation", "").startswith("20") for r in prometheus.rules()),
        timeout=30,
        what="every rule evaluated",
    )
    failing = {r["name"]: r.get("lastError") for r in prometheus.rules() if r["health"] != "ok"}
    assert not failing
    firing = sorted(r["name"] for r in prometheus.rules() if r.get("state") == "firing")
    print(f"{len(rules)} rules evaluated; firing: {firing}")
