"""Golden files: tests/golden/NAME.yaml rendered must equal NAME.yaml.injected.

Regenerate with `make golden-update` (pytest --update-golden) and review the
diff. A golden file whose input is gone fails, as does an input without one.
Each case may have NAME.config, an injector config to render it with.

The injector's version in the status annotation is replaced by a placeholder
on both sides of the comparison (and when writing), so a release does not
rewrite every golden file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from injector.render import RenderError, dump_documents, render_text
from tests.helpers import (
    GOLDEN_CASES,
    GOLDEN_DIR,
    case_config,
    injected_pods,
    pods_of,
    render_case,
    run,
)

CASES = GOLDEN_CASES
INJECTING = [case for case in CASES if any(injected_pods(case))]
VERSION = re.compile(r'"version":"[^"]*"')
VERSION_PLACEHOLDER = '"version":"<version>"'


def without_version(text: str) -> str:
    return VERSION.sub(VERSION_PLACEHOLDER, text)


def golden_text(case: Path) -> str:
    """What the golden file holds: the rendering, its warnings and notes, or the denial."""
    try:
        rendered = render_text(case.read_text(), case_config(case))
    except RenderError as err:
        return f"# denied: {err}\n"
    header = "".join(f"# warning: {w}\n" for w in rendered.warnings)
    header += "".join(f"# note: {n}\n" for n in rendered.notes)
    return without_version(header + dump_documents(rendered.documents))


def test_enough_cases() -> None:
    assert len(CASES) >= 20
    assert len(INJECTING) >= 20


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_golden(case: Path, update_golden: bool) -> None:
    golden = case.with_name(case.name + ".injected")
    actual = golden_text(case)
    if update_golden:
        golden.write_text(actual)
        return
    assert golden.exists(), f"{golden.name} is missing: run `make golden-update` and review it"
    expected = without_version(golden.read_text())
    assert actual == expected, f"{golden.name} is stale: run `make golden-update`"


def test_the_version_is_a_placeholder_in_golden_files() -> None:
    statuses = [g for g in GOLDEN_DIR.glob("*.injected") if '"version":' in g.read_text()]
    assert len(statuses) >= 20
    for golden in statuses:
        assert set(VERSION.findall(golden.read_text())) == {VERSION_PLACEHOLDER}, golden.name


@pytest.mark.parametrize("case", INJECTING, ids=lambda p: p.stem)
def test_idempotent(case: Path) -> None:
    """Running the webhook on its own output changes nothing."""
    config = case_config(case)
    rendered = render_case(case)
    assert rendered is not None
    for document in rendered.documents:
        for pod in pods_of(document):
            namespace = (document.get("metadata") or {}).get("namespace") or "default"
            again = run(pod, config, namespace)
            assert again.ops == [], f"second pass patched: {again.ops}"
            assert again.outcome in ("unchanged", "skipped")


def test_no_stale_golden_files() -> None:
    inputs = {case.name for case in CASES}
    orphans = [
        g.name
        for g in GOLDEN_DIR.glob("*.injected")
        if g.name.removesuffix(".injected") not in inputs
    ]
    assert not orphans, f"golden files without an input: {orphans}"


def test_golden_outputs_are_yaml() -> None:
    for golden in GOLDEN_DIR.glob("*.injected"):
        list(yaml.safe_load_all(golden.read_text()))
