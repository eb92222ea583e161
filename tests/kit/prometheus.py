"""A real Prometheus (built from its Go module, hack/binaries/promtool) for the e2e tests.

`pod_monitor_job` turns one of the chart's PodMonitors into the scrape job the
Prometheus Operator would generate from it (pod discovery through a kubeconfig,
the selector and port kept, the target labels `namespace`, `pod`, `container`
and `job` as the operator sets them, then the monitor's own relabelings), so a
test scrapes exactly what the chart selects. `Prometheus` runs the server on
127.0.0.1 and answers instant queries and the rule states over its HTTP API.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

import yaml

from common.ports import free_port
from common.processes import log_tail, spawn_group, stop_group
from devcluster import wait_for
from devcluster.binaries import ensure_binaries

_NOT_A_NAME = re.compile(r"[^a-zA-Z0-9_]")


def meta_label(kind: str, name: str) -> str:
    """Prometheus's discovery label for a pod label (kind `label` or `labelpresent`)."""
    return f"__meta_kubernetes_pod_{kind}_{_NOT_A_NAME.sub('_', name)}"


def relabeling(operator: dict[str, Any]) -> dict[str, Any]:
    """One of a monitor's relabelings (the operator's camelCase) in Prometheus's own form."""
    names = {
        "sourceLabels": "source_labels",
        "targetLabel": "target_label",
        "regex": "regex",
        "action": "action",
        "replacement": "replacement",
        "separator": "separator",
        "modulus": "modulus",
    }
    return {names[key]: value for key, value in operator.items()}


def pod_monitor_job(monitor: dict[str, Any], kubeconfig: Path, interval: str) -> dict[str, Any]:
    """The scrape job of a PodMonitor's (only) endpoint."""
    spec = monitor["spec"]
    (endpoint,) = spec["podMetricsEndpoints"]
    namespace, name = monitor["metadata"]["namespace"], monitor["metadata"]["name"]
    discovery: dict[str, Any] = {"role": "pod", "kubeconfig_file": str(kubeconfig)}
    selected = spec.get("namespaceSelector") or {}
    if not selected.get("any"):
        discovery["namespaces"] = {"names": selected.get("matchNames") or [namespace]}
    keep = [
        {
            "source_labels": [meta_label("label", key), meta_label("labelpresent", key)],
            "regex": f"({re.escape(value)});true",
            "action": "keep",
        }
        for key, value in (spec["selector"].get("matchLabels") or {}).items()
    ]
    keep.append(
        {
            "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": endpoint["port"],
            "action": "keep",
        }
    )
    targets = [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"target_label": "job", "replacement": f"{namespace}/{name}"},
    ]
    own = [relabeling(r) for r in endpoint.get("relabelings") or []]
    return {
        "job_name": f"podMonitor/{namespace}/{name}/0",
        "scrape_interval": interval,
        "metrics_path": endpoint.get("path", "/metrics"),
        "scheme": endpoint.get("scheme", "http"),
        "kubernetes_sd_configs": [discovery],
        "relabel_configs": [*keep, *targets, *own],
    }


@dataclass
class Prometheus:
    """prometheus on 127.0.0.1, scraping `jobs` and evaluating `rule_groups`."""

    directory: Path
    jobs: list[dict[str, Any]]
    rule_groups: list[dict[str, Any]] = field(default_factory=list)
    interval: str = "2s"
    port: int = 0
    process: Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.directory / "prometheus.log"

    def start(self) -> None:
        binary = ensure_binaries(["prometheus"])["prometheus"]
        rules = self.directory / "rules.yaml"
        rules.write_text(yaml.safe_dump({"groups": self.rule_groups}))
        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(rules)],
            "scrape_configs": self.jobs,
        }
        config_file = self.directory / "prometheus.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = free_port()
        args = [
            str(binary),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.process = spawn_group(args, self.log, die_with_parent=True)
        wait_for(self._ready, timeout=60, what=f"prometheus ready:\n{log_tail(self.log)}")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, timeout=10)
            self.process = None
        shutil.rmtree(self.directory / "data", ignore_errors=True)

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{log_tail(self.log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                return True
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """The JSON answer of GET /api/v1/<path>; a failed query's answer, not an exception."""
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as err:  # 400/422: the body says what was wrong
            answer = json.load(err)
        return answer

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr, time=f"{time.time():.3f}")

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets", state="active")["data"]["activeTargets"]
        return active

    def rules(self) -> list[dict[str, Any]]:
        groups = self.api("rules")["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]
