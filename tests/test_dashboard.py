"""The Grafana dashboard (charts/bento-juicefs/dashboards/bento-juicefs.json) queries real metrics.

Every query parses as PromQL (promql-parser, a port of Prometheus's parser),
and every metric name in its PromQL (the panels' targets and the variables'
label_values queries) must be one the code defines, as scraped: the names
tests/kit/metrics.py reads from the injector's, the sidecar's and the
node agent's source (and checks against a real scrape of their registries).
A renamed metric, or a typo, fails here rather than as an empty panel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest

from tests.kit.metrics import code_metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "charts" / "bento-juicefs" / "dashboards" / "bento-juicefs.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
# Grafana's interval variables stand for durations; any other variable is a label value.
_DURATIONS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
_LABEL_VALUES = re.compile(r"^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)")
# The attributes of promql_parser's nodes that hold sub-expressions.
_CHILDREN = ("expr", "lhs", "rhs", "args", "param", "vector_selector")


def parse(expr: str) -> Any:
    """The expression as Prometheus parses it, Grafana's variables given example values
    (promql-parser: the Rust port of Prometheus's own parser); ValueError if it does not."""
    text = _VARIABLE.sub(lambda m: _DURATIONS.get(m[1], "x"), expr)
    return promql_parser.parse(text)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, read from its syntax tree."""
    names: set[str] = set()
    pending = [parse(expr)]
    while pending:
        node = pending.pop()
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        for attribute in _CHILDREN:
            child = getattr(node, attribute, None)
            if isinstance(child, list | tuple):
                pending.extend(child)
            elif child is not None and type(child).__module__ == "promql_parser":
                pending.append(child)
    return names


def scraped_names() -> set[str]:
    """Every series name a scrape of the code's registries can show."""
    names = set()
    for metric in code_metrics():
        if metric.kind == "histogram":
            names |= {metric.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(metric.name)
    return names


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels") or [])


def queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    for panel in panels(board["panels"]):
        for target in panel.get("targets") or []:
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = _LABEL_VALUES.match(text)
            assert match, f"variable {variable['name']}: {text}"
            yield f"variable {variable['name']!r}", match[1]


def test_the_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(x_bucket{outcome=~"$o"}[$__rate_interval])))'
        " / on (namespace, pod) group_left (bento) y_info and z == 1 - time() > bool 0"
    )
    assert metric_names(expr) == {"x_bucket", "y_info", "z"}
    with pytest.raises(ValueError, match="parenthesis"):
        parse("sum by (le (rate(x[5m]))")


def test_every_metric_the_dashboard_queries_is_one_the_code_defines() -> None:
    known = scraped_names()
    seen: set[str] = set()
    problems = []
    for where, expr in queries(dashboard()):
        names = metric_names(expr)
        assert names, f"{where} names no metric: {expr}"
        seen |= names
        problems += [f"{where}: {name}" for name in sorted(names - known)]
    assert not problems, "not defined by the code: " + "; ".join(problems)
    # The three components each have panels.
    for prefix in ("bento_juicefs_admission_", "bento_juicefs_sidecar_", "bento_juicefs_node_"):
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


@pytest.mark.parametrize("row", ["Injector", "Sidecars", "Node caches"])
def test_a_row_per_component(row: str) -> None:
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert row in rows
