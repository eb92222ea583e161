"""The one I/O part of the check: read the cluster, and shake hands with the webhook.

GETs through the kubernetes_asyncio ApiClient (no kubectl), as the API's
JSON; TLS handshakes with the webhook's endpoints when they are reachable
from here. Nothing here decides: the checks judge what it read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from injector.check.agent import NODE_AGENT
from injector.check.deployed import (
    DEFAULT_NAMESPACE,
    ConfigChoice,
    configmap_path,
    deployed_config,
    with_namespace,
)
from injector.check.endpoints import ready_addresses, service_port_name, webhook_service
from injector.check.namespaces import opted_in_namespaces
from injector.check.rows import Row
from injector.check.run import run_checks
from injector.check.state import ClusterState, Endpoints, Obj, Probe, Unreadable, dig
from injector.check.webhook import apiserver_server_name, our_webhook
from injector.config import InjectorConfig
from injector.kube import ApiException, new_api_client
from injector.namespaces import credential_secret_names

# How many of the webhook's endpoints to connect to, and how long to wait for each.
MAX_PROBES = 4
PROBE_TIMEOUT = 3.0


class ApiReader:
    """GETs by path through the kubernetes_asyncio ApiClient: the API's JSON, as served."""

    def __init__(self, api: Any) -> None:
        self._api = api

    async def get(self, path: str, **query: str) -> Any:
        return await self._api.call_api(
            path,
            "GET",
            query_params=list(query.items()),
            header_params={"Accept": "application/json"},
            response_types_map={200: "object"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _request_timeout=30,
        )

    async def maybe(self, path: str, **query: str) -> Obj | Unreadable | None:
        """The object, None when it does not exist, Unreadable when the API refuses."""
        try:
            return dict(await self.get(path, **query))
        except ApiException as err:
            if err.status == 404:
                return None
            return Unreadable(f"{err.status} {err.reason}")

    async def items(self, path: str, **query: str) -> list[Obj] | Unreadable:
        found = await self.maybe(path, **query)
        if found is None:
            return Unreadable("404 Not Found")
        if isinstance(found, Unreadable):
            return found
        return list(found.get("items") or [])


async def probe_tls(
    host: str, port: int, server_name: str, seconds: float = PROBE_TIMEOUT
) -> Probe:
    """Connect and take the leaf certificate presented, unverified (the check judges it)."""
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=server_name),
            seconds,
        )
    except (OSError, TimeoutError, ssl.SSLError) as err:
        return Probe(address, server_name, error=str(err) or type(err).__name__)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    if not der:
        return Probe(address, server_name, error="no certificate presented")
    return Probe(address, server_name, leaf_pem=ssl.DER_cert_to_PEM_cert(der).encode())


async def fetch_endpoints(
    api: ApiReader, webhook: Obj | Unreadable | None, config: InjectorConfig
) -> Endpoints:
    """Where the apiserver calls the webhook; a handshake with each place reachable from here."""
    if not isinstance(webhook, Mapping):
        return Endpoints("none", "", "")
    client = our_webhook(webhook, config).get("clientConfig") or {}
    server_name = apiserver_server_name(webhook, config)
    if client.get("url"):
        url = urlsplit(str(client["url"]))
        probe = await probe_tls(url.hostname or "", url.port or 443, server_name)
        return Endpoints("url", str(client["url"]), server_name, None, (probe,))
    service = webhook_service(client, config)
    target = str(service)
    svc = await api.maybe(f"/api/v1/namespaces/{service.namespace}/services/{service.name}")
    if svc is None:
        return Endpoints("service", target, server_name, 0)
    slices = await api.items(
        f"/apis/discovery.k8s.io/v1/namespaces/{service.namespace}/endpointslices",
        labelSelector=f"kubernetes.io/service-name={service.name}",
    )
    if isinstance(slices, Unreadable):
        return Endpoints("service", target, server_name, None)
    addresses = ready_addresses(slices, service_port_name(svc, service.port))
    probes = await asyncio.gather(
        *(probe_tls(host, port, server_name) for host, port in addresses[:MAX_PROBES])
    )
    return Endpoints("service", target, server_name, len(addresses), tuple(probes))


async def fetch(api_client: Any, config: InjectorConfig) -> ClusterState:
    """Read everything the checks need. Raises only when the apiserver cannot be reached."""
    api = ApiReader(api_client)
    home = config.webhook.namespace
    version = dict(await api.get("/version"))
    nodes = await api.items("/api/v1/nodes")
    namespaces = await api.items("/api/v1/namespaces")
    webhook = await api.maybe(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"
        + config.webhook.configuration_name
    )
    ca_secret = await api.maybe(
        f"/api/v1/namespaces/{home}/secrets/{config.webhook.ca_secret_name}"
    )
    endpoints = await fetch_endpoints(api, webhook, config)
    names = credential_secret_names(config)
    sources = {name: await api.maybe(f"/api/v1/namespaces/{home}/secrets/{name}") for name in names}
    opted = [] if isinstance(namespaces, Unreadable) else opted_in_namespaces(namespaces, config)
    wanted = [(ns, name) for ns in opted for name in credential_secret_names(config, ns)]
    found = await asyncio.gather(
        *(api.maybe(f"/api/v1/namespaces/{ns}/secrets/{name}") for ns, name in wanted)
    )
    keys = config.labels
    bento_pods = await asyncio.gather(
        *(
            api.items(
                f"/api/v1/namespaces/{ns}/pods",
                labelSelector=f"{keys.model_store}={keys.model_store_value}",
            )
            for ns in opted
        )
    )
    daemonset = await api.maybe(f"/apis/apps/v1/namespaces/{home}/daemonsets/{NODE_AGENT}")
    pods: list[Obj] | Unreadable = []
    if isinstance(daemonset, Mapping):
        match = dig(daemonset, "spec", "selector", "matchLabels") or {}
        selector = ",".join(f"{k}={v}" for k, v in sorted(match.items()))
        pods = await api.items(f"/api/v1/namespaces/{home}/pods", labelSelector=selector)
    return ClusterState(
        version=version,
        nodes=nodes,
        namespaces=namespaces,
        webhook=webhook,
        ca_secret=ca_secret,
        endpoints=endpoints,
        sources=sources,
        copies=dict(zip(wanted, found, strict=True)),
        daemonset=daemonset,
        agent_pods=pods,
        bento_pods=dict(zip(opted, bento_pods, strict=True)),
    )


class Unreachable(Exception):
    """No cluster to check: the kubeconfig does not load, or the apiserver does not answer."""


@dataclass(frozen=True)
class Checked:
    """What a check of a cluster found: the rows, where the cluster is, and the config judged by."""

    rows: list[Row]
    cluster: str
    config: ConfigChoice


async def choose_config(
    api: ApiReader, given: ConfigChoice | None, namespace: str | None
) -> ConfigChoice:
    """The config given, else the injector's ConfigMap's; moved to namespace when one is named."""
    if given is None:
        home = namespace or DEFAULT_NAMESPACE
        given = deployed_config(await api.maybe(configmap_path(home)), home)
    if namespace is None or namespace == given.config.webhook.namespace:
        return given
    return replace(given, config=with_namespace(given.config, namespace))


async def check_cluster(
    kubeconfig: str | None,
    config: ConfigChoice | None,
    *,
    context: str | None = None,
    namespace: str | None = None,
) -> Checked:
    """Fetch and check: the rows, where the cluster is (for the heading), and the config used.

    config None: the injector's ConfigMap's (the defaults when it cannot be
    read). context: the kubeconfig's context to use. namespace: the
    injector's, in place of the config's `webhook.namespace`.
    """
    try:
        api = await new_api_client(kubeconfig, context)
    except Exception as err:  # the loader raises anything on a bad file (TypeError on an empty one)
        raise Unreachable(f"cannot load the kubeconfig: {type(err).__name__}: {err}") from err
    host = str(api.configuration.host)
    try:
        chosen = await choose_config(ApiReader(api), config, namespace)
        state = await fetch(api, chosen.config)
    except (ApiException, aiohttp.ClientError, OSError, TimeoutError) as err:
        raise Unreachable(f"cannot reach {host}: {type(err).__name__}: {err}") from err
    finally:
        await api.close()
    return Checked([*chosen.rows, *run_checks(state, chosen.config)], host, chosen)
