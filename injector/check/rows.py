"""The table's rows: a verdict, what it is about, what was found, what to do.

FAIL means something blocks injection (or the pods it makes); the command
then exits 1. The wording helpers keep every row's lists and counts alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from injector.check.state import Unreadable

Verdict = Literal["ok", "warn", "FAIL"]
VERDICTS: tuple[Verdict, ...] = ("ok", "warn", "FAIL")

# How many names a row lists before "and N more".
SHOWN = 5


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    check: str
    subject: str
    verdict: Verdict
    found: str
    fix: str = ""


def listed(names: Sequence[str]) -> str:
    """Names joined by commas, the first SHOWN of them and how many more."""
    if len(names) <= SHOWN:
        return ", ".join(names)
    return f"{', '.join(names[:SHOWN])} and {len(names) - SHOWN} more"


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def unreadable(check: str, subject: str, what: str, why: Unreadable) -> Row:
    """The row for an object the kubeconfig may not read: a warning, the check skipped."""
    return Row(
        check,
        subject,
        "warn",
        f"cannot read {what}: {why.reason}; not checked",
        "run the check with a kubeconfig that may read it (e.g. cluster-admin)",
    )


def exit_code(rows: Iterable[Row]) -> int:
    """1 when something blocks injection (a FAIL), else 0."""
    return 1 if any(row.verdict == "FAIL" for row in rows) else 0
