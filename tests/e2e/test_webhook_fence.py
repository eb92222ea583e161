"""The injector may change only the caBundle of its own webhook (bento-juicefs-webhook-fence).

Its RBAC lets it patch the MutatingWebhookConfiguration it keeps its CA in;
the admission policy holds that to the caBundle. The apiserver (1.37) runs
ValidatingAdmissionPolicies on admissionregistration objects other than the
policies and bindings themselves, so the fence is the apiserver's: shown
here with the injector's own identity (impersonated), every patch a
server-side dry run.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from devcluster import Cluster
from devcluster.installs.injector_install import InjectorInstall

WEBHOOK = "bento-juicefs-injector"
INJECTOR = "system:serviceaccount:bento-juicefs-system:bento-juicefs-injector"
POLICY = "ValidatingAdmissionPolicy 'bento-juicefs-webhook-fence'"


def as_injector(cluster: Cluster, ops: list[dict[str, Any]]) -> tuple[bool, str]:
    """A JSON patch of the webhook configuration by the injector; (allowed, stderr)."""
    proc = cluster.kubectl(
        "patch", "mutatingwebhookconfiguration", WEBHOOK, f"--as={INJECTOR}",
        "--type=json", "-p", json.dumps(ops), "--dry-run=server",
        check=False,
    )  # fmt: skip
    return proc.returncode == 0, " ".join(proc.stderr.split())


def test_the_injector_may_replace_its_ca_bundle(
    cluster: Cluster, injector: InjectorInstall
) -> None:
    bundle = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nnot a real one\n").decode()
    ops = [{"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": bundle}]
    allowed, stderr = as_injector(cluster, ops)
    assert allowed, stderr


@pytest.mark.parametrize(
    ("what", "ops"),
    [
        (
            "send it Secrets",
            [{"op": "add", "path": "/webhooks/0/rules/0/resources/-", "value": "secrets"}],
        ),
        (
            "reach kube-system",
            [{"op": "remove", "path": "/webhooks/0/namespaceSelector"}],
        ),
        (
            "fail closed for the cluster",
            [{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Fail"}],
        ),
        (
            "point it elsewhere",
            [
                {
                    "op": "replace",
                    "path": "/webhooks/0/clientConfig/service/path",
                    "value": "/elsewhere",
                }
            ],
        ),
        (
            "add a webhook",
            [{"op": "add", "path": "/webhooks/-", "value": {"name": "more.example.com"}}],
        ),
        (
            "relabel it",
            [{"op": "add", "path": "/metadata/labels/owner", "value": "attacker"}],
        ),
    ],
)
def test_the_injector_may_not_widen_its_webhook(
    cluster: Cluster, injector: InjectorInstall, what: str, ops: list[dict[str, Any]]
) -> None:
    allowed, stderr = as_injector(cluster, ops)
    assert not allowed, f"the injector could {what}"
    if "more.example.com" in json.dumps(ops):
        # An incomplete webhook may be refused by the API's own validation first.
        assert POLICY in stderr or "Required value" in stderr, stderr
        return
    assert POLICY in stderr, stderr
    assert "the injector may change only" in stderr


def test_people_are_not_fenced(cluster: Cluster, injector: InjectorInstall) -> None:
    ops = [{"op": "replace", "path": "/webhooks/0/timeoutSeconds", "value": 7}]
    proc = cluster.kubectl(
        "patch", "mutatingwebhookconfiguration", WEBHOOK,
        "--type=json", "-p", json.dumps(ops), "--dry-run=server",
    )  # fmt: skip
    assert proc.returncode == 0
