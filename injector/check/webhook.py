"""The webhook configuration's caBundle against the certificate the injector serves.

The injector's Secret holds the CA each replica issues its serving
certificate from (ca.crt), or, when another tool provides it, the serving
certificate itself (tls.crt): the caBundle of every webhook must verify it.
What the reachable endpoints present is `endpoints.py`'s.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from injector.check.certificates import (
    describe,
    load_certificates,
    same_certificate,
    valid_at,
    verify_served,
)
from injector.check.rows import CheckId, Row, listed, plural, unreadable
from injector.check.state import Obj, Unreadable, dig, secret_bytes
from injector.config import InjectorConfig

# Keys of the injector's shared CA Secret (injector.pki.shared_ca), and of a
# serving-certificate Secret (cert-manager's kind).
CA_CERT_KEY = "ca.crt"
TLS_CERT_KEY = "tls.crt"

CHECK: CheckId = "webhook-cabundle"


def our_webhook(webhook_configuration: Obj, config: InjectorConfig) -> Obj:
    """The injector's webhook in the configuration (by name; else the first one)."""
    hooks = webhook_configuration.get("webhooks") or []
    for hook in hooks:
        if hook.get("name") == config.webhook.name:
            return dict(hook)
    return dict(hooks[0]) if hooks else {}


def apiserver_server_name(webhook_configuration: Obj, config: InjectorConfig) -> str:
    """The name the apiserver verifies the webhook's certificate for."""
    client = our_webhook(webhook_configuration, config).get("clientConfig") or {}
    if client.get("url"):
        return urlsplit(str(client["url"])).hostname or ""
    service = client.get("service") or {}
    name = service.get("name") or config.webhook.service_name
    namespace = service.get("namespace") or config.webhook.namespace
    return f"{name}.{namespace}.svc"


def ca_bundles(webhook_configuration: Obj) -> list[tuple[str, bytes | None]]:
    """(webhook name, decoded caBundle or None when it is not base64) per webhook."""
    found: list[tuple[str, bytes | None]] = []
    for hook in webhook_configuration.get("webhooks") or []:
        encoded = dig(hook, "clientConfig", "caBundle") or ""
        try:
            found.append((str(hook.get("name")), base64.b64decode(encoded, validate=True)))
        except ValueError:
            found.append((str(hook.get("name")), None))
    return found


def without_injector(webhook_configuration: Obj, config: InjectorConfig) -> str:
    """What happens to a Bento pod when the apiserver cannot call the webhook."""
    if our_webhook(webhook_configuration, config).get("failurePolicy") == "Fail":
        return "every Bento pod is refused (failurePolicy Fail)"
    return (
        "Bento pods are created without the sidecar (failurePolicy Ignore) and the "
        "sidecar-required policy refuses them"
    )


def bundle_fix(config: InjectorConfig) -> str:
    """What to do about a caBundle that does not trust what is served: who fills it."""
    namespace = config.webhook.namespace
    if config.server.self_signed and config.webhook.manage_ca_bundle:
        return (
            "the injector patches the caBundle at start and every "
            "webhook.caBundleCheckSeconds: is it running? "
            f"(kubectl -n {namespace} get pods; its log says ca_bundle.*)"
        )
    return (
        "webhook.manageCaBundle is off: whoever provides the certificate must fill the "
        "caBundle (cert-manager: the cert-manager.io/inject-ca-from annotation)"
    )


def bundle_problems(
    bundles: Sequence[tuple[str, bytes | None]], now: dt.datetime
) -> tuple[list[str], dict[str, list[x509.Certificate]]]:
    """What makes each webhook's caBundle unusable, and the certificates each one holds.

    Unusable: not base64, empty, no PEM certificate, or every one expired.
    """
    problems: list[str] = []
    certs: dict[str, list[x509.Certificate]] = {}
    for hook, bundle in bundles:
        parsed = load_certificates(bundle) if bundle else []
        if bundle is None:
            problems.append(f"webhook {hook}: the caBundle is not base64")
        elif not bundle:
            problems.append(f"webhook {hook}: the caBundle is empty")
        elif not parsed:
            problems.append(f"webhook {hook}: the caBundle holds no PEM certificate")
        elif not any(valid_at(c, now) for c in parsed):
            problems.append(f"webhook {hook}: every certificate in the caBundle has expired")
        certs[hook] = parsed
    return problems, certs


@dataclass(frozen=True)
class BundleRows:
    """What every caBundle row shares: its subject, the Secret, and what a FAIL means and fixes."""

    subject: str
    secret_name: str
    blocked: str
    fix: str

    def ok(self, found: str) -> Row:
        return Row(CHECK, self.subject, "ok", found)

    def fail(self, found: str) -> Row:
        return Row(CHECK, self.subject, "FAIL", found, self.fix)


def without_secret_row(
    certs: Mapping[str, Sequence[x509.Certificate]], manages_ca: bool, rows: BundleRows
) -> Row:
    """No Secret to judge the caBundle by: FAIL when the injector makes it, else a warning."""
    if manages_ca:
        return rows.fail(
            f"Secret {rows.secret_name}, the CA the injector's serving certificates are "
            "issued from, is missing (the injector creates it at start)"
        )
    held = plural(sum(map(len, certs.values())), "certificate")
    return Row(
        CHECK,
        rows.subject,
        "warn",
        f"the caBundle holds {held}; no Secret {rows.secret_name} to check the serving "
        "certificate against (it comes from elsewhere): judged from the endpoints only",
    )


def served_certificate_row(
    served: bytes,
    bundles: Sequence[tuple[str, bytes | None]],
    server_name: str,
    now: dt.datetime,
    rows: BundleRows,
) -> Row:
    """A serving certificate in the Secret (cert-manager's kind): every caBundle must verify it."""
    for hook, bundle in bundles:
        problem = verify_served(served, bundle or b"", server_name, now)
        if problem is not None:
            return rows.fail(
                f"webhook {hook}: the caBundle does not verify the serving certificate "
                f"in Secret {rows.secret_name} ({TLS_CERT_KEY}) for {server_name}: {problem}; "
                f"{rows.blocked}"
            )
    leaf = load_certificates(served)[0]
    return rows.ok(
        f"verifies the serving certificate in Secret {rows.secret_name} "
        f"({describe(leaf)}) for {server_name}"
    )


def shared_ca_row(
    ca_pem: bytes | None,
    certs: Mapping[str, Sequence[x509.Certificate]],
    now: dt.datetime,
    rows: BundleRows,
) -> Row:
    """The replicas' shared CA (ca.crt): valid now, and in every webhook's caBundle."""
    cas = load_certificates(ca_pem or b"")
    if not cas:
        return rows.fail(
            f"Secret {rows.secret_name} holds no CA certificate ({CA_CERT_KEY}) to issue "
            "serving certificates from (the injector replaces an unusable one)"
        )
    ca = cas[0]
    if not valid_at(ca, now):
        return rows.fail(
            f"the CA in Secret {rows.secret_name} ({describe(ca)}) is not valid now: "
            f"the serving certificates it issues are refused; {rows.blocked}"
        )
    missing = [
        hook for hook, found in certs.items() if not any(same_certificate(ca, c) for c in found)
    ]
    if missing:
        return rows.fail(
            f"the caBundle of webhook {listed(missing)} does not hold the CA in Secret "
            f"{rows.secret_name} ({describe(ca)}), which issues every replica's serving "
            f"certificate: {rows.blocked}"
        )
    others = len({c.fingerprint(hashes.SHA256()) for found in certs.values() for c in found}) - 1
    extra = f" (and {plural(others, 'older CA')} still trusted)" if others > 0 else ""
    return rows.ok(
        f"trusts the CA in Secret {rows.secret_name} ({describe(ca)}), the issuer of every "
        f"replica's serving certificate{extra}"
    )


def check_ca_bundle(
    webhook_configuration: Obj | Unreadable | None,
    ca_secret: Obj | Unreadable | None,
    config: InjectorConfig,
    now: dt.datetime | None = None,
) -> list[Row]:
    """The webhook configuration's caBundle against the certificate the injector serves.

    The injector's Secret holds the CA each replica issues its serving
    certificate from (ca.crt), or, when another tool provides it, the serving
    certificate itself (tls.crt): the caBundle of every webhook must verify it.
    """
    now = now or dt.datetime.now(dt.UTC)
    subject = f"MutatingWebhookConfiguration {config.webhook.configuration_name}"
    if isinstance(webhook_configuration, Unreadable):
        return [unreadable(CHECK, subject, "the webhook configuration", webhook_configuration)]
    if webhook_configuration is None:
        return [
            Row(
                CHECK,
                subject,
                "FAIL",
                "not found: the injector is not installed, nothing is injected",
                "install it: kubectl apply -k manifests/base (see docs/check.md)",
            )
        ]
    bundles = ca_bundles(webhook_configuration)
    if not bundles:
        return [Row(CHECK, subject, "FAIL", "it has no webhooks", "apply manifests/base again")]
    rows = BundleRows(
        subject,
        f"{config.webhook.namespace}/{config.webhook.ca_secret_name}",
        "the apiserver's TLS calls to the injector fail: "
        + without_injector(webhook_configuration, config),
        bundle_fix(config),
    )
    problems, certs = bundle_problems(bundles, now)
    if problems:
        return [rows.fail("; ".join(problems) + f": {rows.blocked}")]
    if isinstance(ca_secret, Unreadable):
        return [unreadable(CHECK, subject, f"Secret {rows.secret_name}", ca_secret)]
    if ca_secret is None:
        manages_ca = config.server.self_signed and config.webhook.manage_ca_bundle
        return [without_secret_row(certs, manages_ca, rows)]
    served = secret_bytes(ca_secret, TLS_CERT_KEY)
    if served:
        server_name = apiserver_server_name(webhook_configuration, config)
        return [served_certificate_row(served, bundles, server_name, now, rows)]
    return [shared_ca_row(secret_bytes(ca_secret, CA_CERT_KEY), certs, now, rows)]
