"""Where the apiserver calls the webhook, and whether the caBundle verifies what answers there.

Deciding where to connect is pure (the Service the webhook names, its ready
endpoints' addresses); `fetch.py` connects. Endpoints not reachable from
where the check runs are no verdict on the cluster: the apiserver may reach
what this machine cannot.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from injector.check.certificates import describe, load_certificates, verify_served
from injector.check.rows import CheckId, Row, plural
from injector.check.state import Endpoints, Obj, Unreadable, dig
from injector.check.webhook import bundle_fix, ca_bundles, our_webhook, without_injector
from injector.config import InjectorConfig


@dataclass(frozen=True)
class WebhookService:
    """The Service the webhook's clientConfig names, with the config's defaults filled in."""

    namespace: str
    name: str
    port: int

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def webhook_service(client_config: Obj, config: InjectorConfig) -> WebhookService:
    service = client_config.get("service") or {}
    return WebhookService(
        str(service.get("namespace") or config.webhook.namespace),
        str(service.get("name") or config.webhook.service_name),
        int(service.get("port") or 443),
    )


def service_port_name(service: Obj | Unreadable, port: int) -> str | None:
    """The name of the Service's port `port` ("" when unnamed).

    None when it cannot be told (the Service unreadable, or no such port):
    then the endpoints' first port is taken, whatever its name.
    """
    if isinstance(service, Unreadable):
        return None
    names = [
        str(entry.get("name") or "")
        for entry in dig(service, "spec", "ports") or []
        if int(entry.get("port") or 0) == port
    ]
    return names[-1] if names else None


def ready_addresses(slices: Sequence[Obj], port_name: str | None) -> list[tuple[str, int]]:
    """(address, port) of every endpoint not known to be unready, sorted, each once.

    The port is the slice's port of that name (any when port_name is None).
    """
    addresses: set[tuple[str, int]] = set()
    for item in slices:
        ports = [
            int(p["port"])
            for p in item.get("ports") or []
            if port_name is None or (p.get("name") or "") == port_name
        ]
        for endpoint in item.get("endpoints") or []:
            if dig(endpoint, "conditions", "ready") is False:
                continue
            addresses.update(
                (address, p) for address in endpoint.get("addresses") or [] for p in ports[:1]
            )
    return sorted(addresses)


def check_endpoints(
    webhook_configuration: Obj | Unreadable | None,
    endpoints: Endpoints,
    config: InjectorConfig,
    now: dt.datetime | None = None,
) -> list[Row]:
    """Connect to where the apiserver calls the webhook; the caBundle must verify what is served."""
    now = now or dt.datetime.now(dt.UTC)
    check: CheckId = "webhook-endpoint"
    if not isinstance(webhook_configuration, Mapping) or endpoints.kind == "none":
        return []  # the caBundle row says why
    bundle = dict(ca_bundles(webhook_configuration)).get(
        str(our_webhook(webhook_configuration, config).get("name"))
    )
    if endpoints.kind == "service" and endpoints.ready == 0:
        return [
            Row(
                check,
                f"Service {endpoints.target}",
                "FAIL",
                "no ready endpoint: no injector pod is ready to answer, so "
                + without_injector(webhook_configuration, config),
                f"kubectl -n {config.webhook.namespace} get pods,endpointslices; its /readyz "
                "waits for the caBundle (log: readyz.*)",
            )
        ]
    reached = [p for p in endpoints.probes if p.leaf_pem is not None]
    if not reached:
        why = "; ".join(f"{p.address}: {p.error}" for p in endpoints.probes) or "nothing to try"
        if endpoints.kind == "url":
            return [
                Row(
                    check,
                    endpoints.target,
                    "warn",
                    f"not reachable from here ({why}): the serving certificate was checked "
                    "against the Secret only (caBundle line)",
                    "is the injector running? (the apiserver may reach it where this check cannot)",
                )
            ]
        ready = "" if endpoints.ready is None else f"{plural(endpoints.ready, 'ready endpoint')}, "
        return [
            Row(
                check,
                f"Service {endpoints.target}",
                "ok",
                f"{ready}not reachable from here ({why}): the serving certificate was checked "
                "against the Secret only (caBundle line); run the check inside the cluster "
                "network to verify what each replica serves",
            )
        ]
    rows = []
    for probe in reached:
        assert probe.leaf_pem is not None
        problem = verify_served(probe.leaf_pem, bundle or b"", probe.server_name, now)
        leaf = load_certificates(probe.leaf_pem)
        shown = describe(leaf[0]) if leaf else "an unreadable certificate"
        if problem is None:
            rows.append(
                Row(
                    check,
                    probe.address,
                    "ok",
                    f"connected: presents {shown}, which the caBundle verifies for "
                    f"{probe.server_name}",
                )
            )
        else:
            rows.append(
                Row(
                    check,
                    probe.address,
                    "FAIL",
                    f"connected: presents {shown}, which the caBundle does not verify for "
                    f"{probe.server_name} ({problem}): the apiserver's calls fail TLS, so "
                    + without_injector(webhook_configuration, config),
                    bundle_fix(config),
                )
            )
    for probe in endpoints.probes:
        if probe.leaf_pem is None:
            rows.append(
                Row(check, probe.address, "warn", f"not reachable from here: {probe.error}")
            )
    return rows
