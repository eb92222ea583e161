"""Escapes refused: no annotation or label takes a pod out of its boundaries, no secret leaks.

A pod's author controls its labels and annotations; the injector adds a
sidecar that speaks for the pod to the privileged node agent. Nothing they
write may make that sidecar (or the pod) mount a host path, read another
namespace's Secrets or another Bento's directory, and the credentials it
gets never appear in the pod spec, the status annotation, the
AdmissionResponse or the injector's logs.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonpatch
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from kubernetes_asyncio.client.exceptions import ApiException
from structlog.testing import capture_logs

from injector.config import InjectorConfig, parse_config
from injector.namespaces import NamespaceController
from injector.server import build_app
from tests.fuzzing import check_no_escape
from tests.helpers import bento_pod, run

DEFAULT = InjectorConfig()
TWO_VOLUMES = parse_config({"juicefs": {"allowedVolumes": ["models", "team-a"]}})
POD_CACHE = parse_config({"cache": {"mode": "pod"}})
CONFIGS = {"default": DEFAULT, "two-volumes": TWO_VOLUMES, "pod-cache": POD_CACHE}

# What an attacker writes where a path, a model, a volume or a Secret is named.
PATHS = [
    "..",
    "../..",
    "../other-team",
    "../../etc/passwd",
    "/",
    "/etc",
    "/var/lib/kubelet/pods",
    "/mnt/stateful_partition/kube-ephemeral-ssd/bento-juicefs",
    "models/../..",
    "models/..",
    "models/",
    "./models",
    "models\x00",
    "models\n/..",
    "~/models",
    "%2e%2e%2fetc",
    "\u2024\u2024",  # one-dot leaders, which look like ..
    "..\\..\\windows",
    "kube-system/juicefs-models-credentials",
    "team-a/../models",
    "host:/etc",
    "file:///etc/passwd",
]
# Every annotation that names a path, a model, a volume, or where the cache lives.
PATH_ANNOTATIONS = ["models", "volume", "cache-mode", "cache-size"]


def annotated(**annotations: str) -> dict[str, Any]:
    pod = bento_pod()
    pod["metadata"]["annotations"] = {f"juicefs.bentoml.com/{k}": v for k, v in annotations.items()}
    return pod


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("annotation", PATH_ANNOTATIONS)
@pytest.mark.parametrize("value", PATHS)
def test_a_path_in_an_annotation_is_denied_naming_it(
    config_name: str, annotation: str, value: str
) -> None:
    key = f"juicefs.bentoml.com/{annotation}"
    result = run(annotated(**{annotation: value}), CONFIGS[config_name])
    assert result.outcome == "denied", result.reason
    assert f"annotation {key}=" in result.reason
    assert "expected" in result.reason


@pytest.mark.parametrize("label", ["yatai.ai/bento-repository", "yatai.ai/bento-version"])
@pytest.mark.parametrize("value", PATHS)
def test_a_path_in_the_bento_labels_is_denied_naming_it(label: str, value: str) -> None:
    pod = bento_pod()
    pod["metadata"]["labels"][label] = value
    result = run(pod)
    assert result.outcome == "denied", result.reason
    assert label in result.reason


@pytest.mark.parametrize(
    "models", ["llama3", "llama3:v1", "llama3:v1,tokenizer", "a..b:v1..2", "x.y-z_1:V1"]
)
def test_model_tags_never_leave_the_bento_directory(models: str) -> None:
    pod = annotated(models=models)
    result = run(pod)
    assert result.outcome == "injected"
    patched = jsonpatch.apply_patch(pod, result.ops)
    check_no_escape(pod, patched, DEFAULT)
    sidecar = patched["spec"]["initContainers"][0]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["JFS_BENTO_PATH"] == "/bentos/llama3-service/v1"
    for tag in env["JFS_MODELS"].split(","):
        assert "/" not in tag


def added_volumes(pod: dict[str, Any], config: InjectorConfig) -> list[dict[str, Any]]:
    result = run(pod, config)
    assert result.outcome == "injected", result.reason
    patched = jsonpatch.apply_patch(pod, result.ops)
    check_no_escape(pod, patched, config)
    before = {v["name"] for v in pod["spec"].get("volumes") or []}
    return [v for v in patched["spec"]["volumes"] if v["name"] not in before]


@pytest.mark.parametrize(
    "annotations",
    [
        {},
        {"volume": "team-a"},
        {"cache-mode": "node", "volume": "team-a"},
        {"cache-mode": "pod", "cache-size": "1Ti"},
        {"ssd-policy": "off", "warmup": "false", "models": "llama3:v1"},
    ],
)
def test_no_volume_the_injector_adds_is_a_host_path(annotations: dict[str, str]) -> None:
    """The node cache too is the node agent's to mount: the pod gets emptyDirs only."""
    volumes = added_volumes(annotated(**annotations), TWO_VOLUMES)
    assert [v["name"] for v in volumes] == ["juicefs-mount-dir", "juicefs-cache", "juicefs-agent"]
    assert {next(k for k in v if k != "name") for v in volumes} == {"emptyDir"}


def test_a_pods_own_host_path_named_like_ours_is_refused() -> None:
    pod = bento_pod(volumes=[{"name": "juicefs-cache", "hostPath": {"path": "/"}}])
    result = run(pod)
    assert result.outcome == "denied"
    assert "spec.volumes already has a volume named 'juicefs-cache'" in result.reason
    # Claiming to be injected (the status annotation) does not make it ours.
    pod["metadata"]["annotations"] = {"juicefs.bentoml.com/status": "{}"}
    forged = run(pod)
    assert forged.outcome == "denied"
    assert "volume 'juicefs-cache' is hostPath, not what the injector creates" in forged.reason


@pytest.mark.parametrize("volume", ["models", "team-a"])
def test_credentials_are_the_pods_own_namespace_secret_of_an_allowed_volume(volume: str) -> None:
    pod = annotated(volume=volume)
    result = run(pod, TWO_VOLUMES)
    patched = jsonpatch.apply_patch(pod, result.ops)
    sidecar = patched["spec"]["initContainers"][0]
    refs = [e["valueFrom"].get("secretKeyRef") for e in sidecar["env"] if "valueFrom" in e]
    refs = [r for r in refs if r is not None]
    assert {r["name"] for r in refs} == {f"juicefs-{volume}-credentials"}
    # A secretKeyRef has no namespace: it can only ever be the pod's own.
    assert all(set(r) <= {"name", "key", "optional"} for r in refs)


@pytest.mark.parametrize(
    "volume",
    [
        "other-team",
        "kube-system/juicefs-models-credentials",
        "juicefs-models-credentials",
        "Models",
        "models ",
    ],
)
def test_a_volume_outside_the_allowed_list_is_denied(volume: str) -> None:
    result = run(annotated(volume=volume), TWO_VOLUMES)
    assert result.outcome == "denied"
    assert "expected one of models, team-a (the volumes of" in result.reason


# -- another tenant's volume ------------------------------------------------------------------

TENANT_VOLUMES = parse_config(
    {
        "juicefs": {
            "allowedVolumes": ["models", "team-a", "team-b"],
            "volumeNamespaces": {"models": ["ops"], "team-a": ["team-a"], "team-b": ["team-b"]},
        }
    }
)


def test_a_pod_naming_another_tenant_s_volume_is_denied_naming_its_own() -> None:
    result = run(annotated(volume="team-b"), TENANT_VOLUMES, namespace="team-a")
    assert result.outcome == "denied"
    assert "names a volume namespace 'team-a' may not use" in result.reason
    assert "expected one of team-a" in result.reason
    assert "patch" not in result.response["response"]


def test_a_pod_naming_no_volume_gets_its_namespace_s_only_volume() -> None:
    result = run(bento_pod(), TENANT_VOLUMES, namespace="team-a")
    assert result.outcome == "injected", result.reason
    assert "juicefs-team-a-credentials" in json.dumps(result.ops)
    assert "juicefs-models-credentials" not in json.dumps(result.ops)


def test_a_namespace_with_no_volume_of_its_own_is_denied_saying_so() -> None:
    result = run(bento_pod(), TENANT_VOLUMES, namespace="team-c")
    assert result.outcome == "denied"
    assert "namespace 'team-c' may use no volume: none is assigned to it" in result.reason


# -- secrets never leave the Secret -----------------------------------------------------------

META_URL = "redis://tenant:s3cr3t-redis-pw@redis.storage:6379/1"
ACCESS_KEY = "AKIAFUZZACCESSKEY0001"
SECRET_KEY = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRETKEY"
SECRETS = [META_URL, ACCESS_KEY, SECRET_KEY, "s3cr3t-redis-pw"]


def leaked(text: str) -> list[str]:
    """Which secret values (as written, or base64) text holds."""
    found = []
    for value in SECRETS:
        encoded = base64.b64encode(value.encode()).decode()
        if value in text or encoded in text:
            found.append(value)
    return found


@pytest.fixture
def credentials_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process holds the credentials, as the node agent and a sidecar do."""
    monkeypatch.setenv("JFS_META_URL", META_URL)
    monkeypatch.setenv("JFS_ACCESS_KEY", ACCESS_KEY)
    monkeypatch.setenv("JFS_SECRET_KEY", SECRET_KEY)


@pytest.fixture
async def mutate(tmp_path: Path) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    config = parse_config({"server": {"certDir": str(tmp_path / "certs")}})
    client = TestClient(TestServer(build_app(config)))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def review_body(pod: dict[str, Any], uid: str) -> bytes:
    request = {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "operation": "CREATE",
        "namespace": "serving",
        "object": pod,
        "userInfo": {"username": "alice"},
    }
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    return json.dumps(review).encode()


@pytest.mark.usefixtures("credentials_in_env")
async def test_admission_logs_and_answers_hold_no_secret(
    mutate: TestClient[web.Request, web.Application],
) -> None:
    # The pod's own app carries a literal credential, as a careless chart might.
    pod = bento_pod()
    pod["spec"]["containers"][0]["env"] = [{"name": "JFS_SECRET_KEY", "value": SECRET_KEY}]
    bad = annotated(warmup="maybe")
    answers = []
    with capture_logs() as logs:
        for _index, body in enumerate([review_body(pod, "u-1"), review_body(bad, "u-2")]):
            response = await mutate.post(
                "/mutate", data=body, headers={"Content-Type": "application/json"}
            )
            assert response.status == 200
            answers.append(await response.json())
        garbage = await mutate.post("/mutate", data=b'{"apiVersion": "' + SECRET_KEY.encode())
        assert garbage.status == 400
    decided = [e for e in logs if e["event"] == "admission.decided"]
    assert [e["decision"] for e in decided] == ["injected", "denied"], logs
    assert not leaked(json.dumps(logs, default=str))
    injected = answers[0]["response"]
    ops = json.loads(base64.b64decode(injected["patch"]))
    assert not leaked(json.dumps([op for op in ops if op["path"] != "/spec/containers/0/env"]))
    patched = jsonpatch.apply_patch(pod, ops)
    sidecar = patched["spec"]["initContainers"][0]
    status = patched["metadata"]["annotations"]["juicefs.bentoml.com/status"]
    assert not leaked(json.dumps(sidecar))
    assert not leaked(status)
    for entry in sidecar["env"]:
        if entry["name"] in ("JFS_META_URL", "JFS_ACCESS_KEY", "JFS_SECRET_KEY"):
            assert set(entry) == {"name", "valueFrom"}
            assert set(entry["valueFrom"]) == {"secretKeyRef"}
    assert "secretKeyRef" not in status
    assert not leaked(json.dumps(answers[1]))


class FakeCore:
    """The CoreV1Api calls the namespace controller makes, against one source Secret."""

    def __init__(self, fail_apply: bool = False) -> None:
        self.fail_apply = fail_apply
        self.applied: list[dict[str, Any]] = []

    async def read_namespaced_secret(self, name: str, namespace: str, **_: Any) -> Any:
        data = {
            "metaurl": base64.b64encode(META_URL.encode()).decode(),
            "access-key": base64.b64encode(ACCESS_KEY.encode()).decode(),
            "secret-key": base64.b64encode(SECRET_KEY.encode()).decode(),
        }
        return SimpleNamespace(type="Opaque", data=data)

    async def list_namespace(self, **_: Any) -> Any:
        items = [
            SimpleNamespace(
                metadata=SimpleNamespace(
                    name="team-a",
                    labels={"juicefs.bentoml.com/injection": "enabled"},
                    annotations={},
                ),
                status=SimpleNamespace(phase="Active"),
            )
        ]
        return SimpleNamespace(items=items, metadata=SimpleNamespace(resource_version="1"))

    async def patch_namespaced_secret(
        self, name: str, namespace: str, body: dict[str, Any], **_: Any
    ) -> None:
        if self.fail_apply:
            # An apiserver error that echoes what it was sent.
            echo = SimpleNamespace(
                status=422,
                reason="Unprocessable Entity",
                data=json.dumps(body),
                getheaders=lambda: {"Audit-Id": "x"},
            )
            raise ApiException(http_resp=echo)  # type: ignore[arg-type]
        self.applied.append(body)

    async def patch_namespace(self, name: str, body: dict[str, Any], **_: Any) -> None:
        return None


class FakeRbac:
    async def delete_namespaced_role_binding(self, *_: Any, **__: Any) -> None:
        return None


@pytest.mark.parametrize("fail_apply", [False, True])
@pytest.mark.usefixtures("credentials_in_env")
async def test_the_namespace_controller_copies_secrets_without_logging_them(
    fail_apply: bool,
) -> None:
    controller = NamespaceController(object(), DEFAULT)
    core = FakeCore(fail_apply)
    controller._core, controller._rbac = core, FakeRbac()  # type: ignore[assignment]
    with capture_logs() as logs:
        await controller.reconcile_all()
    events = [e["event"] for e in logs]
    expected = "namespace.reconcile_failed" if fail_apply else "namespace.provisioned"
    assert expected in events, logs
    assert not leaked(json.dumps(logs, default=str)), logs
    if not fail_apply:
        # The copy holds the data (that is its job), in the tenant's namespace only.
        assert core.applied[0]["metadata"]["namespace"] == "team-a"
        assert leaked(json.dumps(core.applied[0]))


@pytest.mark.usefixtures("credentials_in_env")
async def test_a_watch_error_is_logged_without_the_response_body() -> None:
    controller = NamespaceController(object(), DEFAULT)
    body = json.dumps({"data": {"secret-key": SECRET_KEY}})
    error = SimpleNamespace(status=500, reason="Internal", data=body, getheaders=dict)

    async def failing(**_: Any) -> Any:
        raise ApiException(http_resp=error)  # type: ignore[arg-type]

    core = FakeCore()
    core.list_namespace = failing  # type: ignore[method-assign]
    controller._core, controller._rbac = core, FakeRbac()  # type: ignore[assignment]
    import asyncio

    with capture_logs() as logs:
        task = asyncio.create_task(controller.run())
        for _ in range(100):
            await asyncio.sleep(0.01)
            if logs:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [e["event"] for e in logs] == ["namespaces.watch_error"]
    assert logs[0]["error"] == "API error 500 Internal"
    assert not leaked(json.dumps(logs, default=str))
    assert SECRET_KEY in str(ApiException(http_resp=error))  # type: ignore[arg-type]  # what str(err) would have logged


def test_structlog_is_capturable() -> None:
    """The capture above would pass vacuously if loggers were cached before it."""
    with capture_logs() as logs:
        structlog.get_logger("probe").info("probe")
    assert logs == [{"event": "probe", "log_level": "info"}]
