"""The layer contract (.importlinter, run by `make lint`) really catches a violation.

The check runs on a copy of the packages' layout (every module, empty) in a
temporary directory with the repository's own contract file, once as is and
once with one import that crosses the layers the wrong way.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONTRACT = REPO / ".importlinter"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def root_packages() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(CONTRACT)
    return parser["importlinter"]["root_packages"].split()


def copy_layout(target: Path) -> None:
    """Every module of the root packages, empty, at the same path; and the contract."""
    for package in root_packages():
        for module in (REPO / package).rglob("*.py"):
            copy = target / module.relative_to(REPO)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.touch()
    shutil.copy(CONTRACT, target / ".importlinter")
    # Imports the layers allow, so the clean copy has edges to check.
    (target / "injector" / "config.py").write_text("import common.env\n")
    (target / "sidecar" / "env.py").write_text("from common import env\n")
    (target / "tests" / "helpers.py").write_text("import devcluster\nimport injector.config\n")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_layer_is_a_root_package() -> None:
    assert set(root_packages()) == {
        "common",
        "modelstore",
        "injector",
        "sidecar",
        "nodeagent",
        "devcluster",
        "tests",
        "benchmarks",
    }


def test_the_layout_as_declared_passes(tmp_path: Path) -> None:
    copy_layout(tmp_path)
    result = lint_imports(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "offending", "reported"),
    [
        # What the injector did before common.env existed.
        (
            "injector/mutation/sidecar.py",
            "from sidecar import env\n",
            "injector.mutation.sidecar -> sidecar.env",
        ),
        ("sidecar/run.py", "import injector.config\n", "sidecar.run -> injector.config"),
        ("common/logs.py", "import sidecar.agent\n", "common.logs -> sidecar.agent"),
        ("injector/server.py", "import devcluster\n", "injector.server -> devcluster"),
        # A test may check a benchmark's pure parts; a benchmark never reaches for a test.
        ("benchmarks/coldstart.py", "import tests.helpers\n", "benchmarks.coldstart -> tests"),
        # Inside the injector: the config under the decision, the decision under the server.
        (
            "injector/config.py",
            "import injector.admission\n",
            "injector.config -> injector.admission",
        ),
        (
            "injector/namespaces.py",
            "import injector.server\n",
            "injector.namespaces -> injector.server",
        ),
        # The model store is below the sidecar: it never reaches back up.
        ("modelstore/mount.py", "import sidecar.agent\n", "modelstore.mount -> sidecar.agent"),
    ],
)
def test_a_crossing_import_fails_the_check(
    tmp_path: Path, module: str, offending: str, reported: str
) -> None:
    copy_layout(tmp_path)
    (tmp_path / module).write_text(offending)
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "4 kept, 1 broken" in result.stdout
    assert reported in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("module", "offending", "reported"),
    [
        ("injector/podshape.py", "import aiohttp\n", "injector.podshape -> aiohttp"),
        ("sidecar/decisions.py", "import kubernetes_asyncio\n", "sidecar.decisions -> kubernetes"),
        # Indirectly: a pure module importing one that imports a client.
        ("injector/plan.py", "import injector.kube\n", "injector.plan -> injector.kube"),
    ],
)
def test_an_io_library_in_a_pure_module_fails_the_check(
    tmp_path: Path, module: str, offending: str, reported: str
) -> None:
    copy_layout(tmp_path)
    (tmp_path / module).write_text(offending)
    (tmp_path / "injector" / "kube.py").write_text("import kubernetes_asyncio\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "pure decisions import no I/O library BROKEN" in result.stdout, result.stdout
    assert reported in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("module", "offending", "contract", "reported"),
    [
        # What the agent's warmer did before the model store existed.
        (
            "nodeagent/warmer.py",
            "from sidecar.run import stream_model\n",
            "the node agent uses the model store, not the sidecar or the webhook server",
            "nodeagent.warmer -> sidecar.run",
        ),
        (
            "nodeagent/workloads.py",
            "import injector.server\n",
            "the node agent uses the model store, not the sidecar or the webhook server",
            "nodeagent.workloads -> injector.server",
        ),
        (
            "benchmarks/streaming.py",
            "import sidecar.run\n",
            "only the sidecar and its tests run the sidecar's loop",
            "benchmarks.streaming -> sidecar.run",
        ),
    ],
)
def test_the_agent_and_the_benchmarks_keep_off_the_sidecar(
    tmp_path: Path, module: str, offending: str, contract: str, reported: str
) -> None:
    copy_layout(tmp_path)
    (tmp_path / module).write_text(offending)
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout, result.stdout
    assert reported in result.stdout, result.stdout
