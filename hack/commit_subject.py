"""The commit-msg hook: a subject of at most 72 characters, then a blank line.

Run by pre-commit at the commit-msg stage (.pre-commit-config.yaml) with the
message file's path; exits 1 naming what is wrong. Git's own comment lines
(`#`) do not count.
"""

from __future__ import annotations

import sys
from pathlib import Path

MAX_SUBJECT = 72


def problems(message: str) -> list[str]:
    """What is wrong with a commit message's first lines; empty when nothing is."""
    lines = [line for line in message.splitlines() if not line.startswith("#")]
    if not lines or not lines[0].strip():
        return ["the message has no subject line"]
    found = []
    subject = lines[0]
    if len(subject) > MAX_SUBJECT:
        found.append(
            f"the subject is {len(subject)} characters, at most {MAX_SUBJECT} are accepted: "
            "put the details in the body, after a blank line"
        )
    if len(lines) > 1 and lines[1].strip():
        found.append("the second line must be blank: the body starts on the third")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: commit_subject.py MESSAGE_FILE", file=sys.stderr)
        return 2
    found = problems(Path(argv[1]).read_text())
    for problem in found:
        print(f"commit message: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
