"""The table the command prints: a row per verdict, what to do below it, a summary."""

from __future__ import annotations

from collections.abc import Sequence

from injector.check.rows import VERDICTS, Row


def format_table(rows: Sequence[Row], heading: str = "") -> str:
    """The table: VERDICT, ID, ON, FOUND; what to do on a `fix:` line below a row.

    ID is the check's stable ID (docs/troubleshooting.md explains each)."""
    header = ("VERDICT", "ID", "ON", "FOUND")
    cells = [(row.verdict, row.id, row.subject, row.found) for row in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(3)]
    indent = " " * (sum(widths) + 2 * 3)

    def line(cols: tuple[str, str, str, str]) -> str:
        return "  ".join(col.ljust(width) for col, width in zip(cols[:3], widths, strict=True)) + (
            "  " + cols[3]
        )

    out = [heading] if heading else []
    out.append(line(header))
    for row, cols in zip(rows, cells, strict=True):
        out.append(line(cols))
        if row.fix:
            out.append(f"{indent}fix: {row.fix}")
    counts = {verdict: sum(row.verdict == verdict for row in rows) for verdict in VERDICTS}
    summary = f"{counts['FAIL']} FAIL, {counts['warn']} warn, {counts['ok']} ok: "
    if counts["FAIL"]:
        summary += "something blocks injection (the FAIL lines say what to do)"
    else:
        summary += "nothing blocks injection"
    out += ["", summary]
    return "\n".join(out) + "\n"
