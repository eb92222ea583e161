"""The Grafana dashboard (charts/bento-juicefs/dashboards/bento-juicefs.json) queries real metrics.

Every query parses as PromQL (promql-parser, a port of Prometheus's parser),
and every metric name in its PromQL (the panels' targets and the variables'
label_values queries) must be one the code defines, as scraped: the names
tests/kit/metrics.py reads from the injector's, the sidecar's and the
node agent's source (and checks against a real scrape of their registries),
or an upstream one docs/metrics.md lists (the apiserver's admission metrics,
Prometheus's ALERTS: tests/kit/promql.py).
A renamed metric, or a typo, fails here rather than as an empty panel.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from injector.config import InjectorConfig
from tests.kit.dashboard import DASHBOARD, dashboard, panels, queries
from tests.kit.promql import known_names, metric_names, parse

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "manifests" / "base"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_the_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(x_bucket{outcome=~"$o"}[$__rate_interval])))'
        " / on (namespace, pod) group_left (bento) y_info and z == 1 - time() > bool 0"
    )
    assert metric_names(expr) == {"x_bucket", "y_info", "z"}
    with pytest.raises(ValueError, match="parenthesis"):
        parse("sum by (le (rate(x[5m]))")


def test_every_metric_the_dashboard_queries_is_one_the_code_defines() -> None:
    """Or an upstream one of docs/metrics.md's table (the apiserver's admission metrics)."""
    known = known_names()
    seen: set[str] = set()
    problems = []
    for where, expr in queries(dashboard()):
        names = metric_names(expr)
        assert names, f"{where} names no metric: {expr}"
        seen |= names
        problems += [f"{where}: {name}" for name in sorted(names - known)]
    assert not problems, "not defined by the code nor listed as upstream: " + "; ".join(problems)
    # The three components and the apiserver's view of the webhook each have panels.
    for prefix in (
        "bento_juicefs_admission_",
        "bento_juicefs_sidecar_",
        "bento_juicefs_node_",
        "apiserver_admission_webhook_",
        "apiserver_validating_admission_policy_",
    ):
        assert any(name.startswith(prefix) for name in seen), prefix


def test_it_imports_into_any_grafana() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels(board["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    # No data source of the machine it was made on, nor an import-time input
    # that a provisioned (ConfigMap) dashboard would never have filled in.
    text = DASHBOARD.read_text()
    assert "${DS_" not in text
    assert "__inputs" not in board
    ids = [panel["id"] for panel in panels(board["panels"])]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("row", ["Injector", "Apiserver admission", "Sidecars", "Node caches"])
def test_a_row_per_component(row: str) -> None:
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert row in rows


def test_the_apiserver_panels_read_only_this_projects_webhook_and_policies() -> None:
    """The apiserver's series cover every webhook and policy of the cluster: each
    query of them selects ours, by the names the chart gives them."""
    webhook = InjectorConfig().webhook.name
    selectors = {
        "apiserver_admission_webhook_": f'name="{webhook}"',
        "apiserver_validating_admission_policy_": 'policy=~"bento-juicefs-.+"',
    }
    checked = 0
    for where, expr in queries(dashboard()):
        for prefix, selector in selectors.items():
            if any(name.startswith(prefix) for name in metric_names(expr)):
                checked += 1
                assert expr.count(prefix) == expr.count(selector), f"{where}: {expr}"
    assert checked >= 5
    # The policy selector takes every one of the project's policies, and only those.
    policies = [
        doc["metadata"]["name"]
        for path in sorted(POLICIES.glob("policy-*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "ValidatingAdmissionPolicy"
    ]
    assert "bento-juicefs-sidecar-required" in policies
    assert all(re.fullmatch("bento-juicefs-.+", name) for name in policies)


def test_the_layout_has_no_overlap() -> None:
    """Panels of the top level (rows open) share no grid cell."""
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        taken |= cells
