"""The table's rows: a check's ID, a verdict, what it is about, what was found, what to do.

FAIL means something blocks injection (or the pods it makes); the command
then exits 1. The wording helpers keep every row's lists and counts alike.

Every row names its check by a stable ID (`CheckId`): scripts match on it
(`-o json`), and docs/troubleshooting.md says for each what it checks and
how to fix it (tests/test_check_ids.py holds the two lists together). An ID
is never renamed or reused for another check: add a new one instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from injector.check.state import Unreadable

Verdict = Literal["ok", "warn", "FAIL"]

# One per check, and per kind of object a check judges where it judges two.
CheckId = Literal[
    "config-source",
    "server-version",
    "ssd-nodes",
    "streaming-nodes",
    "webhook-cabundle",
    "webhook-endpoint",
    "namespaces-opted-in",
    "namespace-excluded",
    "credentials-source",
    "credentials-copy",
    "node-agent-daemonset",
    "node-agent",
    "pod-not-injected",
    "sidecar-image-skew",
    "readiness-gate-stuck",
]
CHECK_IDS: tuple[CheckId, ...] = get_args(CheckId)
VERDICTS: tuple[Verdict, ...] = ("ok", "warn", "FAIL")

# How many names a row lists before "and N more".
SHOWN = 5


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    id: CheckId
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


def unreadable(check: CheckId, subject: str, what: str, why: Unreadable) -> Row:
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
