"""A second mutating webhook, to see how ours behaves next to others.

It runs after ours (webhooks are called in name order) and either strips
`restartPolicy` from our sidecar or adds a container, as real-world webhooks
(policy engines, log shippers) sometimes do. It runs in its own process
(`python -m tests.e2e.webhooks`); the test switches its mode through a file.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from common.ports import free_port, port_answers
from common.processes import log_tail, spawn_group, stop_group
from devcluster import Cluster
from injector.pki.authority import generate_bundle
from injector.pki.cert_files import CertFiles, server_ssl_context

NAME = "zz-e2e-test-webhook"
REPO = Path(__file__).resolve().parents[2]


def patch_for(mode: str, pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod.get("spec") or {}
    if mode == "strip-restart-policy":
        for index, container in enumerate(spec.get("initContainers") or []):
            if container.get("name") == "juicefs-mount" and "restartPolicy" in container:
                return [{"op": "remove", "path": f"/spec/initContainers/{index}/restartPolicy"}]
    if mode == "add-container":
        names = [c.get("name") for c in spec.get("containers") or []]
        if "added-later" not in names:
            container = {"name": "added-later", "image": "busybox", "command": ["sleep", "inf"]}
            return [{"op": "add", "path": "/spec/containers/-", "value": container}]
    return []


def serve(port: int, workdir: Path) -> None:
    mode_file = workdir / "mode"

    async def handle(request: web.Request) -> web.Response:
        review = await request.json()
        req = review["request"]
        mode = mode_file.read_text().strip() if mode_file.exists() else "off"
        ops = patch_for(mode, req.get("object") or {})
        response: dict[str, Any] = {"uid": req["uid"], "allowed": True}
        if ops:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}
        return web.json_response({**review, "response": response})

    app = web.Application()
    app.router.add_post("/mutate", handle)
    files = CertFiles(workdir / "tls.crt", workdir / "tls.key", workdir / "ca.crt")
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=server_ssl_context(files), print=None)


@dataclass
class TestWebhook:
    __test__ = False  # not a pytest test class

    workdir: Path

    @property
    def mode(self) -> str:
        return (self.workdir / "mode").read_text()

    @mode.setter
    def mode(self, value: str) -> None:
        (self.workdir / "mode").write_text(value)


@contextmanager
def running_test_webhook(cluster: Cluster, workdir: Path) -> Iterator[TestWebhook]:
    bundle = generate_bundle(["127.0.0.1", "localhost"])
    CertFiles(workdir / "tls.crt", workdir / "tls.key", workdir / "ca.crt").write(bundle)
    hook = TestWebhook(workdir)
    hook.mode = "off"
    port = free_port()
    process = spawn_group(
        [sys.executable, "-m", "tests.e2e.webhooks", str(port), str(workdir)],
        workdir / "webhook.log",
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 15
        while not port_answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the e2e test webhook did not start:\n{log_tail(workdir / 'webhook.log')}"
                )
            time.sleep(0.1)
        cluster.apply(_configuration(port, bundle.ca_pem))
        yield hook
    finally:
        cluster.kubectl("delete", "mutatingwebhookconfiguration", NAME, check=False)
        stop_group(process, 10)


def _configuration(port: int, ca_pem: bytes) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": NAME},
        "webhooks": [
            {
                "name": "e2e.test.webhook",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "reinvocationPolicy": "Never",
                "clientConfig": {
                    "url": f"https://127.0.0.1:{port}/mutate",
                    "caBundle": base64.b64encode(ca_pem).decode(),
                },
                "objectSelector": {"matchLabels": {"juicefs.bentoml.com/model-store": "juicefs"}},
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                    }
                ],
            }
        ],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("workdir", type=Path)
    args = parser.parse_args()
    serve(args.port, args.workdir)
