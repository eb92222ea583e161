"""The webhook server over real TLS on loopback: a real socket, a real handshake."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import jsonpatch
import pytest
import structlog
from aiohttp import web
from cryptography import x509

from common.ports import free_port, port_answers
from injector import kube, namespaces
from injector.pki import ca_keeper
from injector.pki.authority import generate_bundle, issue_serving_cert
from injector.pki.serving import TLS, prepare_tls, reload_if_changed
from injector.pki.shared_ca import SharedCa
from injector.server import ClusterAccess, build_app, serve
from tests.helpers import bento_pod
from tests.kit.server import client_context, review_body, server_config, start


@dataclass
class Running:
    url: str
    session: aiohttp.ClientSession
    app: web.Application
    cert_dir: Path

    async def post(
        self, body: bytes, content_type: str = "application/json"
    ) -> aiohttp.ClientResponse:
        return await self.session.post(
            self.url + "/mutate", data=body, headers={"Content-Type": content_type}
        )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    config = server_config(tmp_path)
    runner, app, port = await start(config)
    connector = aiohttp.TCPConnector(ssl=client_context(tmp_path / "certs" / "ca.crt"))
    async with aiohttp.ClientSession(connector=connector) as session:
        yield Running(f"https://127.0.0.1:{port}", session, app, tmp_path / "certs")
    await runner.cleanup()


async def test_injects_over_tls(server: Running) -> None:
    pod = bento_pod()
    resp = await server.post(review_body(pod))
    assert resp.status == 200
    body = await resp.json()
    assert body["apiVersion"] == "admission.k8s.io/v1"
    assert body["kind"] == "AdmissionReview"
    response = body["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    patched = jsonpatch.apply_patch(pod, ops)
    assert patched["spec"]["initContainers"][0]["name"] == "juicefs-mount"
    # Only the keys an apiserver reads: nothing it would reject as unknown.
    assert set(response) <= {
        "uid",
        "allowed",
        "patchType",
        "patch",
        "warnings",
        "status",
        "auditAnnotations",
    }


async def test_unselected_pod_allowed_without_patch(server: Running) -> None:
    pod = bento_pod()
    del pod["metadata"]["labels"]["juicefs.bentoml.com/model-store"]
    body = await (await server.post(review_body(pod))).json()
    assert body["response"] == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


async def test_denial_carries_status_message(server: Running) -> None:
    pod = bento_pod()
    pod["metadata"]["annotations"] = {"juicefs.bentoml.com/cache-size": "lots"}
    body = await (await server.post(review_body(pod))).json()
    response = body["response"]
    assert response["allowed"] is False
    assert "juicefs.bentoml.com/cache-size='lots'" in response["status"]["message"]
    assert response["status"]["code"] == 400


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "not an AdmissionReview"),
        (
            review_body(bento_pod(), apiVersion="admission.k8s.io/v1beta1"),
            "apiVersion must be 'admission.k8s.io/v1'",
        ),
        (review_body(bento_pod(), kind="Pod"), "kind must be 'AdmissionReview'"),
        (review_body(bento_pod(), request={"uid": ""}), "request.uid"),
        (
            json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
            "request is missing",
        ),
    ],
    ids=[
        "malformed-json",
        "not-an-object",
        "wrong-api-version",
        "wrong-kind",
        "empty-uid",
        "no-request",
    ],
)
async def test_bad_requests_get_400(server: Running, body: bytes, expected: str) -> None:
    resp = await server.post(body)
    assert resp.status == 400
    text = await resp.text()
    assert expected in text
    assert "Traceback" not in text


async def test_missing_uid_gets_400(server: Running) -> None:
    doc = json.loads(review_body(bento_pod()))
    del doc["request"]["uid"]
    resp = await server.post(json.dumps(doc).encode())
    assert resp.status == 400
    assert "request.uid is missing" in await resp.text()


async def test_wrong_content_type_gets_400(server: Running) -> None:
    resp = await server.post(review_body(bento_pod()), content_type="text/yaml")
    assert resp.status == 400
    assert "not application/json" in await resp.text()


async def test_oversized_body_gets_413(server: Running) -> None:
    pod = bento_pod()
    pod["metadata"]["annotations"] = {"filler": "x" * (100 * 1024)}
    resp = await server.post(review_body(pod))
    assert resp.status == 413
    assert "maxBodyBytes" in await resp.text()


async def test_dry_run_answers_the_same_and_is_logged(server: Running) -> None:
    pod = bento_pod(name="")
    pod["metadata"]["generateName"] = "llama-"
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        wet = await (await server.post(review_body(pod))).json()
        dry = await (await server.post(review_body(pod, request={"dryRun": True}))).json()
    assert wet["response"]["patch"] == dry["response"]["patch"]
    decided = [entry for entry in logs if entry["event"] == "admission.decided"]
    assert [entry["dry_run"] for entry in decided] == [False, True]
    assert decided[0]["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert decided[0]["namespace"] == "serving"
    assert decided[0]["pod"] == "llama-*"
    assert decided[0]["decision"] == "injected"


async def test_health_ready_and_metrics(server: Running) -> None:
    assert (await server.session.get(server.url + "/healthz")).status == 200
    assert (await server.session.get(server.url + "/readyz")).status == 200
    await server.post(review_body(bento_pod()))
    await server.post(b"nope")
    text = await (await server.session.get(server.url + "/metrics")).text()
    assert 'bento_juicefs_admission_requests_total{outcome="injected"} 1.0' in text
    assert 'bento_juicefs_admission_requests_total{outcome="bad_request"} 1.0' in text
    assert "bento_juicefs_admission_duration_seconds_bucket" in text


async def test_readyz_waits_for_checks(tmp_path: Path) -> None:
    problem: list[str | None] = ["caBundle not patched yet"]

    async def check() -> str | None:
        return problem[0]

    runner, _, port = await start(server_config(tmp_path), [check])
    connector = aiohttp.TCPConnector(ssl=client_context(tmp_path / "certs" / "ca.crt"))
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            resp = await session.get(f"https://127.0.0.1:{port}/readyz")
            assert resp.status == 503
            assert "caBundle" in await resp.text()
            problem[0] = None
            assert (await session.get(f"https://127.0.0.1:{port}/readyz")).status == 200
    finally:
        await runner.cleanup()


def _peer_serial(port: int, ca: Path) -> int:
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        client_context(ca).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_certificate_reload_keeps_connections(server: Running) -> None:
    """A new serving cert is picked up by new handshakes; open connections keep working."""
    cert_dir = server.cert_dir
    port = int(server.url.rsplit(":", 1)[1])
    before = await asyncio.to_thread(_peer_serial, port, cert_dir / "ca.crt")
    # An open keep-alive connection from before the rotation.
    assert (await server.session.get(server.url + "/healthz")).status == 200

    cert_pem, key_pem = issue_serving_cert(
        (cert_dir / "ca.crt").read_bytes(),
        (cert_dir / "ca.key").read_bytes(),
        ["localhost", "127.0.0.1"],
    )
    (cert_dir / "tls.key").write_bytes(key_pem)
    (cert_dir / "tls.crt").write_bytes(cert_pem)
    assert reload_if_changed(server.app[TLS]) is True
    assert reload_if_changed(server.app[TLS]) is False

    after = await asyncio.to_thread(_peer_serial, port, cert_dir / "ca.crt")
    assert after != before
    assert after == x509.load_pem_x509_certificate(cert_pem).serial_number
    assert (await server.session.get(server.url + "/healthz")).status == 200


def test_cert_manager_files_are_required_when_not_self_signed(tmp_path: Path) -> None:
    config = server_config(tmp_path, selfSigned=False)
    with pytest.raises(FileNotFoundError, match="cert-manager"):
        prepare_tls(config)


def test_cert_manager_files_are_used_as_given(tmp_path: Path) -> None:
    bundle = generate_bundle(["localhost"])
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    (cert_dir / "tls.crt").write_bytes(bundle.cert_pem)
    (cert_dir / "tls.key").write_bytes(bundle.key_pem)
    state = prepare_tls(server_config(tmp_path, selfSigned=False))
    assert state.ca_key is None
    assert (cert_dir / "tls.crt").read_bytes() == bundle.cert_pem


class FakeApiClient:
    """Stands in for kubernetes_asyncio's ApiClient: records that it was closed."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def close(self) -> None:
        self.events.append("api closed")


@pytest.fixture
def cluster_events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A fake API client and namespace controller, recording what starts and stops."""
    events: list[str] = []

    async def new_api_client(kubeconfig: str | None) -> FakeApiClient:
        events.append(f"api opened ({kubeconfig})")
        return FakeApiClient(events)

    async def run(self: namespaces.NamespaceController) -> None:
        events.append("controller started")
        try:
            await asyncio.Event().wait()
        finally:
            events.append("controller stopped")

    monkeypatch.setattr(kube, "new_api_client", new_api_client)
    monkeypatch.setattr(namespaces.NamespaceController, "run", run)
    return events


async def test_cluster_parts_start_with_the_app_and_stop_before_the_client_closes(
    tmp_path: Path, cluster_events: list[str]
) -> None:
    config = server_config(tmp_path, selfSigned=True)
    config = config.model_copy(
        update={"webhook": config.webhook.model_copy(update={"manage_ca_bundle": False})}
    )
    app = build_app(config, cluster=ClusterAccess("/tmp/kubeconfig"))
    runner = web.AppRunner(app)
    await runner.setup()
    await asyncio.sleep(0)
    assert app[TLS].files.cert.exists()
    assert cluster_events == ["api opened (/tmp/kubeconfig)", "controller started"]
    await runner.cleanup()
    assert cluster_events[2:] == ["controller stopped", "api closed"]


async def test_a_failed_start_still_closes_the_client(
    tmp_path: Path, cluster_events: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def start(self: ca_keeper.CaKeeper) -> SharedCa:
        raise RuntimeError("apiserver unreachable")

    monkeypatch.setattr(ca_keeper.CaKeeper, "start", start)
    config = server_config(tmp_path, port=free_port())
    with pytest.raises(RuntimeError, match="apiserver unreachable"):
        await serve(config, kubeconfig="/tmp/kubeconfig", stop=asyncio.Event())
    assert cluster_events == ["api opened (/tmp/kubeconfig)", "api closed"]


async def test_serve_drains_then_stops(tmp_path: Path) -> None:
    """SIGTERM (here: stop) fails /readyz at once, keeps serving, then closes the listener."""
    port = free_port()
    config = server_config(tmp_path, port=port, host="127.0.0.1", shutdownDelaySeconds=0.5)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, standalone=True, stop=stop))
    url = f"https://127.0.0.1:{port}"
    ca = tmp_path / "certs" / "ca.crt"
    for _ in range(200):
        if ca.exists() and port_answers(port):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the server never started listening")
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with aiohttp.ClientSession(connector=connector) as session:
        assert (await session.get(url + "/readyz")).status == 200
        stop.set()
        await asyncio.sleep(0.1)
        assert (await session.get(url + "/readyz")).status == 503
        headers = {"Content-Type": "application/json"}
        resp = await session.post(url + "/mutate", data=review_body(bento_pod()), headers=headers)
        assert resp.status == 200
    await asyncio.wait_for(task, timeout=15)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session:
            await session.get(url + "/healthz")
