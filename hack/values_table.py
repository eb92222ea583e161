"""The chart's values table (docs/values.md), helm-docs style, from values.yaml.

One row per value: its key, its type (from values.schema.json), its default
(from values.yaml, as JSON) and its description (the comment right above
the key in values.yaml; from a `# --` line on when there is one, as
helm-docs reads it). A map the schema gives properties to is a section: its
keys get rows of their own, and it gets one only when it has a comment.
Every key of values.yaml must have a schema entry, so the schema keeps up.

    python hack/values_table.py           # rewrite the table in docs/values.md
    python hack/values_table.py --check   # exit 1 when it is stale

Only the text between the markers is generated; tests/test_values_table.py
runs --check.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "bento-juicefs"
DOC = REPO / "docs" / "values.md"
START = "<!-- values-table:start (hack/values_table.py; `make values-table`) -->"
END = "<!-- values-table:end -->"
REGENERATE = "make values-table (python hack/values_table.py)"

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*):(?:\s|$)")
_COMMENT = re.compile(r"^\s*#(?P<text>.*)$")
_TYPES = {
    "string": "string",
    "integer": "int",
    "number": "number",
    "boolean": "bool",
    "array": "list",
    "object": "object",
    "null": "null",
}


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    description: str


def comments(text: str) -> dict[str, str]:
    """Each key's dotted path -> the comment block right above it (no blank line between).

    A comment covers the run of sibling keys right below it, one a line, as
    values.yaml writes a group (`nodeSelector: {}`, `tolerations: []`,
    `affinity: {}` under one comment): a key with no comment of its own on
    the line right after its sibling's gets the sibling's.
    """
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    previous: tuple[int, str] | None = None  # the key on the line before: (indent, path)
    for line in text.splitlines():
        comment = _COMMENT.match(line)
        if comment:
            body = comment.group("text").strip()
            # helm-docs' marker: the description starts here.
            pending = [body[2:].strip()] if body.startswith("--") else [*pending, body]
            previous = None
            continue
        key = _KEY.match(line)
        if not key:
            pending, previous = [], None
            continue
        indent = len(key.group("indent"))
        stack = [(i, k) for i, k in stack if i < indent]
        stack.append((indent, key.group("key")))
        path = ".".join(k for _, k in stack)
        own = " ".join(p for p in pending if p)
        shared = found[previous[1]] if previous and previous[0] == indent else ""
        found[path] = own or shared
        pending, previous = [], (indent, path)
    return found


def type_of(schema: dict[str, Any], value: Any) -> str:
    declared = schema.get("type")
    if declared is None:
        inferred = {bool: "bool", int: "int", float: "number", str: "string", list: "list"}
        return inferred.get(type(value), "object")
    names = [str(name) for name in (declared if isinstance(declared, list) else [declared])]
    return " or ".join(_TYPES.get(name, name) for name in names)


def cell(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("|", "\\|").strip()


def rows(values: dict[str, Any], schema: dict[str, Any], notes: dict[str, str]) -> list[Row]:
    """Every value of values.yaml in its order, each with its schema entry."""
    out: list[Row] = []

    def walk(node: dict[str, Any], props: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            entry = props.get(key)
            if not isinstance(entry, dict):
                raise SystemExit(f"values.yaml: {path} has no entry in values.schema.json; add one")
            description = cell(notes.get(path, ""))
            if isinstance(value, dict) and value and "properties" in entry:
                if description:
                    out.append(Row(path, type_of(entry, value), "", description))
                walk(value, entry["properties"], f"{path}.")
                continue
            default = json.dumps(value, separators=(",", ":"))
            out.append(Row(path, type_of(entry, value), f"`{cell(default)}`", description))

    walk(values, schema.get("properties", {}), "")
    return out


def table(chart: Path) -> str:
    text = (chart / "values.yaml").read_text()
    values = yaml.safe_load(text) or {}
    schema = json.loads((chart / "values.schema.json").read_text())
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for row in rows(values, schema, comments(text)):
        lines.append(f"| `{row.key}` | {row.type} | {row.default} | {row.description} |")
    return "\n".join(lines)


def splice(doc: str, generated: str) -> str:
    """doc with the text between the markers replaced by generated."""
    if START not in doc or END not in doc:
        raise SystemExit(f"the doc lacks the markers {START} and {END}")
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{generated}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the doc is stale")
    parser.add_argument("--chart", type=Path, default=CHART)
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    current = args.doc.read_text()
    wanted = splice(current, table(args.chart))
    if current == wanted:
        return 0
    if args.check:
        print(
            f"{args.doc} is stale against {args.chart / 'values.yaml'}: run {REGENERATE}",
            file=sys.stderr,
        )
        return 1
    args.doc.write_text(wanted)
    print(f"wrote {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
