"""docs/values.md's table is hack/values_table.py's from the chart's values.yaml, up to date.

No Helm needed: the script reads values.yaml (its comments too) and
values.schema.json. A stale table fails with the command that regenerates it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "hack" / "values_table.py"
CHART = REPO / "charts" / "bento-juicefs"
DOC = REPO / "docs" / "values.md"


def values_table(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def rows(text: str) -> dict[str, list[str]]:
    """The table's rows by key: [type, default, description]."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            found[cells[0].strip("`")] = cells[1:]
    return found


def test_the_values_table_is_up_to_date() -> None:
    proc = values_table("--check")
    assert proc.returncode == 0, proc.stderr


def test_a_stale_table_fails_naming_the_command(tmp_path: Path) -> None:
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart, ignore=shutil.ignore_patterns("templates", "dashboards"))
    values = chart / "values.yaml"
    values.write_text(values.read_text().replace("  replicas: 2\n", "  replicas: 3\n", 1))
    doc = tmp_path / "values.md"
    doc.write_text(DOC.read_text())
    proc = values_table("--check", "--chart", str(chart), "--doc", str(doc))
    assert proc.returncode == 1
    assert "is stale" in proc.stderr
    assert "make values-table" in proc.stderr
    # Regenerated, it has the new default, and --check passes again.
    assert values_table("--chart", str(chart), "--doc", str(doc)).returncode == 0
    assert rows(doc.read_text())["injector.replicas"][1] == "`3`"
    assert values_table("--check", "--chart", str(chart), "--doc", str(doc)).returncode == 0


def test_a_value_without_a_schema_entry_fails(tmp_path: Path) -> None:
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart, ignore=shutil.ignore_patterns("templates", "dashboards"))
    values = chart / "values.yaml"
    values.write_text(values.read_text() + "# A new knob.\nnewKnob: 1\n")
    proc = values_table("--check", "--chart", str(chart), "--doc", str(DOC))
    assert proc.returncode != 0
    assert "newKnob has no entry in values.schema.json" in proc.stderr


def test_every_value_has_a_row_with_its_type_default_and_comment() -> None:
    table = rows(DOC.read_text())
    assert table["injector.priorityClassName"][:2] == ["string", '`""`']
    assert table["injector.hostNetwork"][:2] == ["bool", "`false`"]
    assert table["imagePullSecrets"][:2] == ["list", "`[]`"]
    assert table["nodeAgent.resyncSeconds"][0] == "number or null"
    # The description is the comment above the key; the keys of a group share it.
    assert table["injector.hostNetwork"][2].startswith("The node's network")
    assert table["injector.tolerations"][2] == table["injector.nodeSelector"][2] != ""
    # A map the schema has properties for is a section: its keys are rows.
    assert "metrics.podMonitor.enabled" in table
    assert "metrics.podMonitor" not in table  # no comment of its own: no row
    assert "webhook" in table  # commented: a row, without a default
    assert table["webhook"][1] == ""
