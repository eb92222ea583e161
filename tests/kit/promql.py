"""PromQL as Prometheus parses it, and the metrics a query may name.

The parser is promql-parser, a port of Prometheus's own. A query may name a
metric the code defines (tests/kit/metrics.py, as scraped: a histogram as
its `_bucket`, `_sum` and `_count`) or an upstream one listed in
docs/metrics.md's "Upstream metrics" table (the apiserver's admission
metrics, kube-state-metrics, Prometheus's `up` and `ALERTS`). The dashboard's queries
(tests/test_dashboard.py) and the PrometheusRule's (tests/test_alerts.py)
are held to both.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import promql_parser

from tests.kit.metrics import Metric, code_metrics

ROOT = Path(__file__).resolve().parent.parent.parent
METRICS_DOC = ROOT / "docs" / "metrics.md"
UPSTREAM_SECTION = "## Upstream metrics"

_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
# Grafana's interval variables stand for durations; any other variable is a label value.
_DURATIONS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
# The attributes of promql_parser's nodes that hold sub-expressions.
_CHILDREN = ("expr", "lhs", "rhs", "args", "param", "vector_selector")
_ROW = re.compile(r"^\| `([a-zA-Z_:][a-zA-Z0-9_:]*)` \| (\w+) \|")


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


def series_names(metrics: list[Metric]) -> set[str]:
    """Every series name a scrape of these metrics can show."""
    names = set()
    for metric in metrics:
        if metric.kind == "histogram":
            names |= {metric.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(metric.name)
    return names


def scraped_names() -> set[str]:
    """Every series name a scrape of the code's registries can show."""
    return series_names(code_metrics())


def upstream_metrics(doc: str | None = None) -> list[Metric]:
    """The rows of docs/metrics.md's "Upstream metrics" table."""
    text = METRICS_DOC.read_text() if doc is None else doc
    start = text.index(UPSTREAM_SECTION)
    end = text.find("\n## ", start + 1)
    found = []
    for line in text[start : end if end > 0 else None].splitlines():
        match = _ROW.match(line)
        if match:
            found.append(Metric(match[1], match[2], (), "docs/metrics.md"))
    return found


def known_names() -> set[str]:
    """What a query may name: the code's series and the documented upstream ones."""
    return scraped_names() | series_names(upstream_metrics())
