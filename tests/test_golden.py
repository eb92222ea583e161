"""Golden files: tests/golden/NAME.yaml rendered must equal NAME.yaml.injected.

Regenerate with `make golden-update` (pytest --update-golden) and review the
diff. A golden file whose input is gone fails, as does an input without one.
Each case may have NAME.config, an injector config to render it with.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from injector.render import RenderError, dump_documents, render_text
from tests.helpers import GOLDEN_DIR, case_config, pods_of, run

CASES = sorted(GOLDEN_DIR.glob("*.yaml"))


def render_case(case: Path) -> str:
    config = case_config(case)
    try:
        rendered = render_text(case.read_text(), config)
    except RenderError as err:
        return f"# denied: {err}\n"
    header = "".join(f"# warning: {w}\n" for w in rendered.warnings)
    header += "".join(f"# note: {n}\n" for n in rendered.notes)
    return header + dump_documents(rendered.documents)


def test_enough_cases() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_golden(case: Path, update_golden: bool) -> None:
    golden = case.with_name(case.name + ".injected")
    actual = render_case(case)
    if update_golden:
        golden.write_text(actual)
        return
    assert golden.exists(), f"{golden.name} is missing: run `make golden-update` and review it"
    assert actual == golden.read_text(), f"{golden.name} is stale: run `make golden-update`"


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_idempotent(case: Path) -> None:
    """Running the webhook on its own output changes nothing."""
    config = case_config(case)
    try:
        rendered = render_text(case.read_text(), config)
    except RenderError:
        pytest.skip("denied case")
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
