"""Test modules are independent: none imports a test module (`test_*.py`).

What tests share lives in the kit (tests/kit/, tests/helpers.py,
tests/e2e/pods.py) and in the conftest.py files; a test module is something
pytest collects, not a library. Read from each module's AST: its import
statements, and the Python it runs in a subprocess (a string literal with an
import statement).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# `from tests.x.test_y import`, `import tests.test_y` in a string of Python source.
_IN_SOURCE = re.compile(r"\b(?:from|import)\s+(tests(?:\.\w+)*)")


def is_test_module(module: str) -> bool:
    """tests.test_y, tests.e2e.test_y, ...: a module pytest collects."""
    parts = module.split(".")
    return parts[0] == "tests" and any(part.startswith("test_") for part in parts[1:])


def imported(source: str, module: str) -> list[str]:
    """Every module `source` (the module named `module`) imports, absolute."""
    found: list[str] = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append(base)
            if not is_test_module(base):  # `from tests import test_y` imports a module too
                found += [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [m[1] for m in _IN_SOURCE.finditer(node.value)]
    return found


def imports_of_test_modules(source: str, module: str) -> list[str]:
    """The test modules that `source` (the module named `module`) imports, itself included
    (as a script it runs in a subprocess would)."""
    return sorted({m for m in imported(source, module) if is_test_module(m)})


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        found.append((name, path))
    return found


@pytest.mark.parametrize(("name", "path"), modules(), ids=[name for name, _ in modules()])
def test_no_module_imports_a_test_module(name: str, path: Path) -> None:
    """Not a test module, nor the kit: a helper that imports a test module couples them too."""
    wrong = imports_of_test_modules(path.read_text(), name)
    assert not wrong, f"{path.relative_to(REPO)} imports test modules {wrong}: use the kit"


@pytest.mark.parametrize(
    "source",
    [
        "from tests." + "test_server import start\n",
        "import tests.e2e." + "test_pods_on_node\n",
        "from tests.storage import " + "test_mount\n",
        "from ." + "test_server import start\n",
        'SCRIPT = """\nfrom tests.storage.' + 'test_x import run\n"""\n',
    ],
)
def test_the_check_catches_an_import_of_a_test_module(source: str) -> None:
    assert imports_of_test_modules(source, "tests.test_x_other") != []


def test_the_check_lets_the_kit_and_code_under_test_be_imported() -> None:
    source = (
        "from tests.kit.sidecar import FakeReporter\n"
        "from tests.e2e.pods import get_pod\n"
        "import tests.helpers\n"
        "from sidecar.run import run\n"
        "from . import conftest\n"
    )
    assert imports_of_test_modules(source, "tests.test_x") == []
