"""`python -m injector render` and `serve` as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonpatch
import pytest
import yaml

from injector.cli import main
from tests.helpers import bento_pod, run


def write(tmp_path: Path, *docs: object) -> Path:
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump_all(list(docs)))
    return path


def test_render_pod_equals_mutate_applied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pod = bento_pod()
    assert main(["render", "-f", str(write(tmp_path, pod))]) == 0
    rendered = yaml.safe_load(capsys.readouterr().out)
    assert rendered == jsonpatch.apply_patch(pod, run(pod).ops)


def test_render_workloads_and_multiple_documents(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pod = bento_pod()
    template = {"metadata": {"labels": pod["metadata"]["labels"]}, "spec": pod["spec"]}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "llama", "namespace": "serving"},
        "spec": {"selector": {"matchLabels": {"app": "x"}}, "template": template},
    }
    cronjob = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "nightly"},
        "spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": template}}},
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "llama"},
        "spec": {"ports": [{"port": 80}]},
    }
    assert main(["render", "-f", str(write(tmp_path, deployment, service, cronjob))]) == 0
    captured = capsys.readouterr()
    out = list(yaml.safe_load_all(captured.out))
    assert [d["kind"] for d in out] == ["Deployment", "Service", "CronJob"]
    assert out[0]["spec"]["template"]["spec"]["initContainers"][0]["name"] == "juicefs-mount"
    assert out[1] == service
    assert (
        out[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"][0]["name"]
        == "juicefs-mount"
    )
    assert "Service/llama: kind Service has no pod template" in captured.err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"kind: [", "not valid YAML"),
        (b"\xff\xfe\x00binary", "not a UTF-8 text file"),
        (b"- just\n- a list\n", "not a Kubernetes object"),
        (b"", "holds no Kubernetes objects"),
        (b"kind: Deployment\nmetadata: {name: x}\nspec: {}\n", "has no spec.template"),
    ],
)
def test_render_unreadable_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert main(["render", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_render_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "-f", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_render_denied_pod_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pod = bento_pod()
    pod["metadata"]["annotations"] = {"juicefs.bentoml.com/ssd-policy": "sometimes"}
    assert main(["render", "-f", str(write(tmp_path, pod))]) == 2
    assert "ssd-policy='sometimes'" in capsys.readouterr().err


def test_module_entry_point_runs(tmp_path: Path) -> None:
    path = write(tmp_path, bento_pod())
    proc = subprocess.run(
        [sys.executable, "-m", "injector", "render", "-f", "-"],
        input=path.read_text(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "juicefs-mount" in proc.stdout
