"""The Prometheus metrics the code defines, read from its AST (not listed by hand).

Each `Counter(...)`, `Gauge(...)`, `Histogram(...)` or `Summary(...)` with a
literal name in the injector, the sidecar, the node agent and common (a
counter under its scraped name, with `_total`), with its label names.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PACKAGES = ("common", "modelstore", "injector", "sidecar", "nodeagent")
KINDS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram", "Summary": "summary"}


@dataclass(frozen=True, order=True)
class Metric:
    name: str  # as scraped
    kind: str
    labels: tuple[str, ...]
    where: str


def _strings(node: ast.expr | None) -> tuple[str, ...]:
    if isinstance(node, ast.List | ast.Tuple):
        return tuple(str(e.value) for e in node.elts if isinstance(e, ast.Constant))
    return ()


def defined_metrics(source: str, where: str) -> list[Metric]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if called not in KINDS or not node.args:
            continue
        first = node.args[0]
        literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
        assert literal, f"{where}:{node.lineno}: a metric whose name is not a literal"
        kind = KINDS[called]
        name = str(getattr(first, "value", ""))
        if kind == "counter":
            name = name.removesuffix("_total") + "_total"
        labels = _strings(node.args[2] if len(node.args) > 2 else None)
        for keyword in node.keywords:
            if keyword.arg == "labelnames":
                labels = _strings(keyword.value)
        found.append(Metric(name, kind, labels, f"{where}:{node.lineno}"))
    return found


def code_metrics() -> list[Metric]:
    found: list[Metric] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            where = str(path.relative_to(ROOT))
            found += defined_metrics(path.read_text(), where)
    return sorted(found)
