"""Every check ID is unique, and docs/troubleshooting.md says what each checks and fixes.

The IDs are read from the code (`CHECK_IDS`, the values of the `CheckId`
type every row must carry) and from the doc's `## Check lines` table (its
first column): the two lists must be the same, each ID once. The rows of a
run of every check are held to the doc too, so an ID is caught however it
got into a row.
"""

from __future__ import annotations

import re
from pathlib import Path

from injector.check.rows import CHECK_IDS
from injector.check.run import run_checks
from injector.check.state import ClusterState, Endpoints, Unreadable
from injector.config import InjectorConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "troubleshooting.md"
SECTION = "## Check lines"


def documented_ids(doc: str) -> list[str]:
    """The first column of the section's table, in order: `| \\`id\\` | ... |` rows."""
    start = doc.index(f"\n{SECTION}\n")
    end = doc.find("\n## ", start + 1)
    body = doc[start : end if end != -1 else len(doc)]
    return re.findall(r"^\| `([a-z0-9-]+)` \|", body, flags=re.MULTILINE)


def test_documented_ids_reads_the_first_column_only() -> None:
    doc = (
        "intro\n## Check lines\n| ID | what | fix |\n|---|---|---|\n"
        "| `a-b` | x `c-d` | y |\n| `e` | z | w |\n## Next\n| `f` | g | h |\n"
    )
    assert documented_ids(doc) == ["a-b", "e"]


def test_every_check_id_is_unique() -> None:
    assert len(set(CHECK_IDS)) == len(CHECK_IDS), CHECK_IDS
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", check_id) for check_id in CHECK_IDS)


def test_every_check_id_is_documented_once_and_no_other() -> None:
    documented = documented_ids(DOC.read_text())
    duplicated = sorted({i for i in documented if documented.count(i) > 1})
    assert not duplicated, f"listed more than once in {SECTION}: {duplicated}"
    undocumented = [i for i in CHECK_IDS if i not in documented]
    assert not undocumented, f"docs/troubleshooting.md {SECTION} lacks {undocumented}"
    unknown = [i for i in documented if i not in CHECK_IDS]
    assert not unknown, f"{SECTION} lists IDs no check emits: {unknown}"


def test_the_rows_of_every_check_carry_documented_ids() -> None:
    """Two runs that between them reach every check: nothing readable, then nothing at all."""
    documented = set(documented_ids(DOC.read_text()))
    forbidden = Unreadable("403 Forbidden")
    unreadable_state = ClusterState(
        version={},
        nodes=forbidden,
        namespaces=forbidden,
        webhook=forbidden,
        ca_secret=forbidden,
        endpoints=Endpoints("none", "", ""),
        sources={"juicefs-models-credentials": forbidden},
        daemonset=forbidden,
        agent_pods=forbidden,
    )
    empty_state = ClusterState(
        version={"gitVersion": "v1.31.0", "major": "1", "minor": "31"},
        nodes=[],
        namespaces=[{"metadata": {"name": "kube-system", "labels": _opt_in()}}],
        webhook=None,
        ca_secret=None,
        endpoints=Endpoints("none", "", ""),
        daemonset=None,
    )
    config = InjectorConfig()
    rows = [*run_checks(unreadable_state, config), *run_checks(empty_state, config)]
    assert rows
    assert {row.id for row in rows} <= documented


def _opt_in() -> dict[str, str]:
    keys = InjectorConfig().labels
    return {keys.namespace_opt_in: keys.namespace_opt_in_value}
