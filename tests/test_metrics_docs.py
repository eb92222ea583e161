"""docs/metrics.md lists every Prometheus metric the code defines, and every juicefs one it reads.

Read from the code's AST, not listed by hand: each `Counter(...)`,
`Gauge(...)`, `Histogram(...)` or `Summary(...)` with a literal name in the
injector, the sidecar, the node agent and common (a counter under its
scraped name, with `_total`), with its label names; and each `juicefs_...`
string literal in modelstore/sources.py.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.kit.metrics import Metric, code_metrics, defined_metrics

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "metrics.md"
JUICEFS_METRIC = re.compile(r"^juicefs_[a-z_]+$")


def juicefs_metrics() -> list[str]:
    tree = ast.parse((ROOT / "modelstore" / "sources.py").read_text())
    return sorted(
        {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and JUICEFS_METRIC.match(node.value)
        }
    )


def rows(doc: str) -> dict[str, str]:
    """Table rows by the metric in their first cell."""
    found = {}
    for line in doc.splitlines():
        match = re.match(r"^\| `([a-z_]+)`", line)
        if match:
            found[match[1]] = line
    return found


def undocumented(metrics: list[Metric], doc: str) -> list[str]:
    table = rows(doc)
    problems = []
    for metric in metrics:
        row = table.get(metric.name)
        if row is None:
            problems.append(f"{metric.name} ({metric.where}) has no row")
            continue
        cells = [c.strip() for c in row.split("|")]
        if metric.kind not in cells:
            problems.append(f"{metric.name}: its row does not say {metric.kind}")
        for label in metric.labels:
            if f"`{label}`" not in row:
                problems.append(f"{metric.name}: its row does not name label {label}")
    return problems


def test_every_metric_the_code_defines_is_documented() -> None:
    metrics = code_metrics()
    files = {m.where.split(":")[0] for m in metrics}
    # The scan sees each component's metrics: a sidecar metric missing from the doc fails too.
    assert {"injector/metrics.py", "sidecar/metrics.py", "nodeagent/metrics.py"} <= files
    problems = undocumented(metrics, DOC.read_text())
    assert not problems, "docs/metrics.md: " + "; ".join(problems)


def test_every_juicefs_metric_the_sidecar_reads_is_documented() -> None:
    read = juicefs_metrics()
    assert "juicefs_object_request_data_bytes" in read
    table = rows(DOC.read_text())
    assert not [name for name in read if name not in table]


def test_the_check_fails_on_a_metric_missing_from_the_doc() -> None:
    source = (
        "from prometheus_client import Counter, Gauge\n"
        "A = Counter('bento_juicefs_things', 'h', ['outcome'])\n"
        "B = Gauge('bento_juicefs_level', 'h')\n"
    )
    metrics = defined_metrics(source, "x.py")
    assert [m.name for m in metrics] == ["bento_juicefs_things_total", "bento_juicefs_level"]
    doc = "| `bento_juicefs_things_total` | counter | `outcome` | x |\n"
    assert undocumented(metrics, doc) == ["bento_juicefs_level (x.py:3) has no row"]
    doc += "| `bento_juicefs_level` | counter | | x |\n"
    assert undocumented(metrics, doc) == ["bento_juicefs_level: its row does not say gauge"]
    no_label = "| `bento_juicefs_things_total` | counter | | x |\n"
    assert undocumented(metrics[:1], no_label) == [
        "bento_juicefs_things_total: its row does not name label outcome"
    ]


def test_the_scraped_names_are_what_the_registries_expose() -> None:
    """The AST's names (a counter with `_total`) against a real scrape of the three registries."""
    from prometheus_client import generate_latest

    from injector.metrics import Metrics
    from nodeagent.metrics import AgentMetrics
    from sidecar.metrics import SidecarMetrics

    registries = (Metrics().registry, AgentMetrics().registry, SidecarMetrics().registry)
    text = b"".join(generate_latest(registry) for registry in registries).decode()
    scraped = {
        (name, kind)
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
        if not name.endswith("_created")
    }
    assert scraped == {(m.name, m.kind) for m in code_metrics()}


def assert_every_value_at_zero_and_documented(
    metric: str, label: str, values: tuple[str, ...]
) -> None:
    """A fresh injector registry has metric{label=value} at 0 for each value, and
    docs/metrics.md's row for metric names exactly these values, in order."""
    from injector.metrics import Metrics

    registry = Metrics().registry
    for value in values:
        assert registry.get_sample_value(metric, {label: value}) == 0, value
    (row,) = [line for line in DOC.read_text().splitlines() if line.startswith(f"| `{metric}`")]
    assert re.findall(r"`([a-z_]+)`", row.split("|")[4]) == list(values)


def test_every_admission_outcome_is_exported_from_the_start_and_documented() -> None:
    from typing import get_args

    from injector.admission import Outcome
    from injector.metrics import OUTCOMES

    assert set(get_args(Outcome)) <= set(OUTCOMES)
    assert_every_value_at_zero_and_documented(
        "bento_juicefs_admission_requests_total", "outcome", OUTCOMES
    )


def test_every_ca_secret_write_reason_is_exported_from_the_start_and_documented() -> None:
    from injector.metrics import CA_SECRET_WRITE_REASONS

    assert_every_value_at_zero_and_documented(
        "bento_juicefs_ca_secret_writes_total", "reason", CA_SECRET_WRITE_REASONS
    )
