"""The permission tables of docs/security.md and docs/node-agent.md, read as RBAC rules.

Each table row is `| API group | resource | verbs | scope | why |`; the
scope starts with `cluster`, `namespace `X``, or `its own namespace` (a
workload's), and `only `NAME`` lists resourceNames. The unit test compares
the rows with manifests/base (tests/test_rbac_manifests.py), the e2e test
with what the apiserver says each identity may do (tests/e2e/test_rbac.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

DOCS = Path(__file__).resolve().parent.parent / "docs"


class Atom(NamedTuple):
    """One (API group, resource, verb, resource name) a rule grants; name '*' for any."""

    group: str
    resource: str
    verb: str
    name: str


class Row(NamedTuple):
    atoms: frozenset[Atom]
    # "cluster", "own" (each opted-in namespace, for its own service accounts) or a namespace.
    scope: str


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _backticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def documented(doc: str, heading: str) -> list[Row]:
    """The rows of the permissions table under the first heading that starts with heading."""
    lines = (DOCS / doc).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    table = next(i for i in range(start, len(lines)) if lines[i].startswith("| API group |"))
    rows = []
    for line in lines[table + 2 :]:
        if not line.startswith("|"):
            break
        groups, resources, verbs, scope, _why = _cells(line)
        group_names = [
            "" if group.strip() == "core" else group.strip().strip("`")
            for group in groups.split(",")
        ]
        if scope.startswith("cluster"):
            where = "cluster"
        elif scope.startswith("its own namespace"):
            where = "own"
        elif match := re.match(r"namespace `([^`]+)`", scope):
            where = match.group(1)
        else:
            raise AssertionError(f"{doc}: scope {scope!r} is not cluster, namespace or own")
        names_match = re.search(r"only ((?:`[^`]+`(?:,\s*)?)+)", scope)
        names = _backticked(names_match.group(1)) if names_match else ["*"]
        atoms = frozenset(
            Atom(group, resource, verb.strip(), name)
            for group in group_names
            for resource in _backticked(resources)
            for verb in verbs.split(",")
            for name in names
        )
        rows.append(Row(atoms, where))
    assert rows, f"{doc}: no rows under {heading!r}"
    return rows


def expected(rows: list[Row], namespace: str, own: str | None = None) -> set[Atom]:
    """What rows grant in namespace (own: the identity's namespace, for `its own namespace`)."""
    found: set[Atom] = set()
    for row in rows:
        if row.scope in ("cluster", namespace) or (row.scope == "own" and own == namespace):
            found |= row.atoms
    return found
