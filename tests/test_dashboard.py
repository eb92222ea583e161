"""The Grafana dashboard (charts/bento-juicefs/dashboards/bento-juicefs.json) queries real metrics.

Every metric name in its PromQL (the panels' targets and the variables'
label_values queries) must be one the code defines, as scraped: the names
tests/test_metrics_docs.py reads from the injector's, the sidecar's and the
node agent's source (and checks against a real scrape of their registries).
A renamed metric, or a typo, fails here rather than as an empty panel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_metrics_docs import code_metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "charts" / "bento-juicefs" / "dashboards" / "bento-juicefs.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# PromQL words that look like names but are not metrics.
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
# Label lists: by/without (...), on/ignoring (...), group_left/group_right (...).
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_MODIFIER = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\b")
# A name not followed by "(" (a function); numbers never start with a letter.
_NAME = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
_LABEL_VALUES = re.compile(r"^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub("", text)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _LABEL_LIST.sub("", text)
    text = _MODIFIER.sub("", text)
    return {name for name in _NAME.findall(text) if name.lower() not in KEYWORDS}


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
        'histogram_quantile(0.99, sum by (le) (rate(x_bucket{outcome=~"a|b"}[$__rate_interval])))'
        " / on (namespace, pod) group_left (bento) y_info and z == 1 - time() > bool 0"
    )
    assert metric_names(expr) == {"x_bucket", "y_info", "z"}


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
