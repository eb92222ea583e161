"""`python -m injector check`'s arguments, on findings made up here (no cluster).

`check_cluster` (the fetch and the checks) is replaced: what is under test
is what the command passes to it and what it prints of what comes back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import injector.check
from injector.check import Checked, ConfigChoice
from injector.check.report import OUTPUT_FORMATS
from injector.check.rows import Row
from injector.cli import CHECK_OUTPUTS, main
from injector.config import InjectorConfig

HOST = "https://203.0.113.7:6443"
DEFAULTS = ConfigChoice(InjectorConfig(), "(defaults)")
ROWS = [
    Row("server-version", "cluster", "ok", "v1.31.0: native sidecars"),
    Row("ssd-nodes", "local-ssd=true", "warn", "no node of 3 has it", "label the nodes"),
    Row("node-agent", "node n1", "FAIL", "no agent pod on this node", "match the nodeSelector"),
]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """check_cluster replaced: it records what it was given and returns ROWS."""
    seen: list[dict[str, Any]] = []

    async def fake_check_cluster(
        kubeconfig: str | None, config: ConfigChoice | None, **options: Any
    ) -> Checked:
        seen.append({"kubeconfig": kubeconfig, "config": config, **options})
        return Checked(list(ROWS), HOST, config or DEFAULTS)

    monkeypatch.setattr(injector.check, "check_cluster", fake_check_cluster)
    return seen


def test_the_cli_offers_the_formats_the_report_renders() -> None:
    assert CHECK_OUTPUTS == OUTPUT_FORMATS


def test_json_prints_a_document_and_exits_as_the_table_does(
    calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "-o", "json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document == {
        "cluster": HOST,
        "config": "(defaults)",
        "profile": "gke",
        "cacheMode": "node",
        "ssdPolicy": "required",
        "checks": [
            {
                "id": "server-version",
                "verdict": "ok",
                "subject": "cluster",
                "found": "v1.31.0: native sidecars",
                "fix": "",
            },
            {
                "id": "ssd-nodes",
                "verdict": "warn",
                "subject": "local-ssd=true",
                "found": "no node of 3 has it",
                "fix": "label the nodes",
            },
            {
                "id": "node-agent",
                "verdict": "FAIL",
                "subject": "node n1",
                "found": "no agent pod on this node",
                "fix": "match the nodeSelector",
            },
        ],
        "summary": {"ok": 1, "warn": 1, "fail": 1},
    }


def test_yaml_prints_the_same_document(
    calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--output", "json"]) == 1
    as_json = json.loads(capsys.readouterr().out)
    assert main(["check", "--output", "yaml"]) == 1
    assert yaml.safe_load(capsys.readouterr().out) == as_json


def test_the_exit_code_does_not_depend_on_the_format(
    calls: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(
        injector.check, "check_cluster", _returning([row for row in ROWS if row.verdict != "FAIL"])
    )
    for output in OUTPUT_FORMATS:
        assert main(["check", "-o", output]) == 0, output
    out = capsys.readouterr().out
    assert "0 FAIL, 1 warn, 1 ok: nothing blocks injection" in out


def test_the_table_is_the_default(
    calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"cluster {HOST}; config (defaults): profile gke, ")
    assert "\nVERDICT  ID              ON" in out


def test_a_bad_output_format_is_an_argparse_error_naming_the_choices(
    calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["check", "-o", "xml"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument -o/--output: invalid choice: 'xml'" in err
    assert "'table', 'json', 'yaml'" in err
    assert calls == []


def _returning(rows: list[Row]) -> Any:
    async def fake_check_cluster(
        kubeconfig: str | None, config: ConfigChoice | None, **options: Any
    ) -> Checked:
        return Checked(rows, HOST, config or DEFAULTS)

    return fake_check_cluster


def test_context_and_namespace_reach_check_cluster(
    calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["check", "--kubeconfig", "admin.kubeconfig", "--context", "prod-eu", "-n", "models"]
    main(args)
    assert calls == [
        {
            "kubeconfig": "admin.kubeconfig",
            "config": None,
            "context": "prod-eu",
            "namespace": "models",
        }
    ]
    main(["check", "--namespace", "models"])
    assert calls[-1] == {"kubeconfig": None, "config": None, "context": None, "namespace": "models"}


def test_without_config_the_deployed_one_is_asked_for(
    calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    main(["check"])
    assert calls[-1]["config"] is None  # check_cluster reads the ConfigMap
    capsys.readouterr()
    file = tmp_path / "config.yaml"
    file.write_text("scheduling:\n  ssdPolicy: preferred\n")
    main(["check", "--config", str(file), "-o", "json"])
    given = calls[-1]["config"]
    assert isinstance(given, ConfigChoice)
    assert given.source == str(file)
    assert given.config.scheduling.ssd_policy == "preferred"
    document = json.loads(capsys.readouterr().out)
    assert document["config"] == str(file)
    assert document["ssdPolicy"] == "preferred"


def test_a_bad_config_file_is_exit_2_before_any_cluster(
    calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = tmp_path / "config.yaml"
    file.write_text("scheduling:\n  ssdPolicy: sometimes\n")
    assert main(["check", "--config", str(file)]) == 2
    assert "scheduling.ssdPolicy" in capsys.readouterr().err
    assert calls == []
