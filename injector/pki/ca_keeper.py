"""Certificates in a cluster: a CA shared by replicas through a Secret, the caBundle
kept in the MutatingWebhookConfiguration, and a serving cert per replica.

The Secret is the one source of truth, and every replica reads it again on
every check (`webhook.caBundleCheckSeconds`):

- missing: created; replicas race, the loser (409) reads the winner's;
- present but unusable (empty, corrupt PEM, a key that is not the
  certificate's, not a CA, expired or close to it): replaced by an update
  that names the resourceVersion it read, so exactly one replica's CA wins
  and the others read it.

Whoever writes a new CA records the CAs the webhook configuration trusted
until then (`previous-ca.crt`, trusted until the `previous-ca-until`
annotation, ten checks later), so a replica still serving from the old CA
keeps answering while it moves. A replica that finds a CA in the Secret
other than the one it serves adds it to the caBundle first, and issues its
serving certificate from it only once the caBundle has trusted it at two
checks in a row (the apiserver has had a whole period to see it): no
request ever meets a certificate the apiserver does not trust. Nobody
restarts.

The caBundle each replica wants is derived from the Secret alone (current
CA, then the unexpired previous ones), so replicas agree on it byte for
byte and patch it once; the patch tests the configuration's resourceVersion
read before the Secret, so a replica with a stale view loses instead of
undoing a newer patch. Each replica issues its own serving certificate from
the CA, so renewing one never touches the caBundle or the other replicas.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import structlog
from aiohttp import web
from kubernetes_asyncio import client

from injector.config import InjectorConfig
from injector.kube import FIELD_MANAGER, KUBE_API, TIMEOUT, is_status
from injector.lifecycle import READY_CHECKS, CleanupContext, background
from injector.metrics import METRICS, Metrics
from injector.pki.authority import (
    CertFiles,
    ca_problem,
    generate_ca,
    issue_serving_cert,
    service_hosts,
    split_certificates,
    valid_certificates,
    write_atomic,
)
from injector.pki.serving import TLS, reload_if_changed

log = structlog.get_logger("injector.cluster_certs")

CA_CERT_KEY = "ca.crt"
CA_KEY_KEY = "ca.key"
PREVIOUS_KEY = "previous-ca.crt"
PREVIOUS_UNTIL = "juicefs.bentoml.com/previous-ca-until"
# The previous CA stays trusted this many checks after a new one is written.
PREVIOUS_GRACE_CHECKS = 10
# A new CA is served once the caBundle has trusted it at this many checks in a row.
TRUSTED_CHECKS_BEFORE_SERVING = 2


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Conflict(Exception):
    """Someone else wrote first (409, or a failed resourceVersion test): read again."""


@dataclass(frozen=True)
class StoredSecret:
    data: dict[str, bytes]
    annotations: dict[str, str]
    resource_version: str


@dataclass(frozen=True)
class SharedCa:
    """The CA in the Secret, and the CAs it replaced that are still trusted for a while."""

    ca_pem: bytes
    ca_key_pem: bytes
    previous: tuple[bytes, ...] = ()
    previous_until: dt.datetime | None = None

    def trusted(self, now: dt.datetime | None = None) -> list[bytes]:
        """What the caBundle should hold: this CA, then the previous ones until their time."""
        pems = [self.ca_pem]
        if self.previous_until is not None and (now or _now()) < self.previous_until:
            pems.extend(p for p in self.previous if p not in pems)
        return pems


@dataclass(frozen=True)
class WebhookBundles:
    """The caBundle of each webhook in our configuration, decoded, as read."""

    resource_version: str
    bundles: tuple[bytes, ...]

    def all_trust(self, ca_pem: bytes) -> bool:
        return bool(self.bundles) and all(ca_pem in split_certificates(b) for b in self.bundles)

    def certificates(self) -> list[bytes]:
        found: list[bytes] = []
        for bundle in self.bundles:
            found.extend(p for p in valid_certificates(bundle) if p not in found)
        return found


class SecretStore(Protocol):
    async def read(self) -> StoredSecret | None: ...
    async def create(self, data: dict[str, bytes], annotations: dict[str, str]) -> None: ...
    async def replace(
        self, data: dict[str, bytes], annotations: dict[str, str], resource_version: str
    ) -> None: ...


class WebhookStore(Protocol):
    async def read(self) -> WebhookBundles: ...
    async def set_bundle(self, bundle: bytes, current: WebhookBundles) -> None: ...


# -- the Secret and the webhook configuration through the API --------------------


class KubeSecretStore:
    def __init__(self, api: Any, config: InjectorConfig) -> None:
        self._core = client.CoreV1Api(api)
        self.namespace = config.webhook.namespace
        self.name = config.webhook.ca_secret_name
        self._managed_by = config.controller.managed_by

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    async def read(self) -> StoredSecret | None:
        try:
            secret = await self._core.read_namespaced_secret(self.name, self.namespace, **TIMEOUT)
        except client.exceptions.ApiException as err:
            if err.status == 404:
                return None
            raise
        data: dict[str, bytes] = {}
        for key, value in (secret.data or {}).items():
            try:
                data[key] = base64.b64decode(value or "")
            except ValueError:
                data[key] = b""
        return StoredSecret(
            data, dict(secret.metadata.annotations or {}), secret.metadata.resource_version
        )

    def _body(
        self, data: dict[str, bytes], annotations: dict[str, str], resource_version: str = ""
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "labels": {"app.kubernetes.io/managed-by": self._managed_by},
            "annotations": annotations,
        }
        if resource_version:
            metadata["resourceVersion"] = resource_version
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata,
            "type": "Opaque",
            "data": {key: _b64(value) for key, value in data.items()},
        }

    async def create(self, data: dict[str, bytes], annotations: dict[str, str]) -> None:
        try:
            await self._core.create_namespaced_secret(
                self.namespace,
                cast(Any, self._body(data, annotations)),
                field_manager=FIELD_MANAGER,
                **TIMEOUT,
            )
        except client.exceptions.ApiException as err:
            if is_status(err, 409):
                raise Conflict(str(self)) from None
            raise

    async def replace(
        self, data: dict[str, bytes], annotations: dict[str, str], resource_version: str
    ) -> None:
        try:
            await self._core.replace_namespaced_secret(
                self.name,
                self.namespace,
                cast(Any, self._body(data, annotations, resource_version)),
                field_manager=FIELD_MANAGER,
                **TIMEOUT,
            )
        except client.exceptions.ApiException as err:
            if is_status(err, 409, 404):  # changed or deleted since we read it
                raise Conflict(str(self)) from None
            raise


class KubeWebhookStore:
    def __init__(self, api: Any, config: InjectorConfig) -> None:
        self._admission = client.AdmissionregistrationV1Api(api)
        self.name = config.webhook.configuration_name

    async def read(self) -> WebhookBundles:
        current = await self._admission.read_mutating_webhook_configuration(self.name, **TIMEOUT)
        bundles = []
        for hook in current.webhooks or []:
            encoded = hook.client_config.ca_bundle or ""
            try:
                bundles.append(base64.b64decode(encoded))
            except ValueError:
                bundles.append(b"")
        return WebhookBundles(current.metadata.resource_version, tuple(bundles))

    async def set_bundle(self, bundle: bytes, current: WebhookBundles) -> None:
        ops: list[dict[str, Any]] = [
            # A concurrent edit makes this fail instead of being lost.
            {"op": "test", "path": "/metadata/resourceVersion", "value": current.resource_version}
        ]
        ops.extend(
            {"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": _b64(bundle)}
            for index, have in enumerate(current.bundles)
            if have != bundle
        )
        try:
            await self._admission.patch_mutating_webhook_configuration(self.name, ops, **TIMEOUT)
        except client.exceptions.ApiException as err:
            # 422: the resourceVersion test failed; 409: a write raced ours.
            if is_status(err, 409, 422):
                raise Conflict(self.name) from None
            raise


# -- the shared CA -------------------------------------------------------------------


def parse_shared_ca(stored: StoredSecret) -> tuple[SharedCa | None, str | None]:
    """(the CA, None) when the Secret holds a usable one, else (None, what is wrong)."""
    ca_pem, key_pem = stored.data.get(CA_CERT_KEY), stored.data.get(CA_KEY_KEY)
    if not ca_pem or not key_pem:
        return None, f"it lacks {CA_CERT_KEY} or {CA_KEY_KEY}"
    problem = ca_problem(ca_pem, key_pem)
    if problem is not None:
        return None, problem
    ca_pem = split_certificates(ca_pem)[0]  # one canonical encoding for comparisons
    until: dt.datetime | None = None
    try:
        until = dt.datetime.fromisoformat(stored.annotations.get(PREVIOUS_UNTIL, ""))
    except ValueError:
        until = None
    if until is not None and until.tzinfo is None:
        until = until.replace(tzinfo=dt.UTC)
    previous = tuple(
        p for p in valid_certificates(stored.data.get(PREVIOUS_KEY, b"")) if p != ca_pem
    )
    return SharedCa(ca_pem, key_pem, previous, until if previous else None), None


def new_shared_ca(previous: Sequence[bytes], grace: dt.timedelta) -> SharedCa:
    ca_pem, key_pem = generate_ca()
    kept = tuple(dict.fromkeys(p for p in previous if p != ca_pem))
    return SharedCa(ca_pem, key_pem, kept, _now() + grace if kept else None)


def _secret_contents(shared: SharedCa) -> tuple[dict[str, bytes], dict[str, str]]:
    data = {CA_CERT_KEY: shared.ca_pem, CA_KEY_KEY: shared.ca_key_pem}
    annotations: dict[str, str] = {}
    if shared.previous and shared.previous_until is not None:
        data[PREVIOUS_KEY] = b"".join(shared.previous)
        annotations[PREVIOUS_UNTIL] = shared.previous_until.isoformat(timespec="seconds")
    return data, annotations


async def ensure_ca(
    store: SecretStore,
    previous: Sequence[bytes],
    grace: dt.timedelta,
    metrics: Metrics | None = None,
    attempts: int = 5,
) -> SharedCa:
    """The Secret's CA, after creating it if missing or replacing it if unusable.

    previous: the CAs trusted until now (the caBundle's), kept trusted for
    `grace` next to a CA written here.
    """
    for _ in range(attempts):
        found = await store.read()
        problem: str | None = None
        if found is not None:
            shared, problem = parse_shared_ca(found)
            if shared is not None:
                return shared
        fresh = new_shared_ca(previous, grace)
        data, annotations = _secret_contents(fresh)
        try:
            if found is None:
                await store.create(data, annotations)
            else:
                await store.replace(data, annotations, found.resource_version)
        except Conflict:
            continue  # another replica wrote first: read what it wrote
        reason = "missing" if found is None else "invalid"
        if metrics is not None:
            metrics.ca_repairs.labels(reason).inc()
        log.info(
            "ca.created" if found is None else "ca.replaced",
            secret=str(store),
            reason=problem,
            previous_trusted_until=(
                fresh.previous_until.isoformat() if fresh.previous_until else None
            ),
        )
        return fresh
    raise RuntimeError(f"could not create or read a usable CA in Secret {store}")


@dataclass
class CaKeeper:
    """One replica's side: serve from the Secret's CA, keep the caBundle trusting it.

    `serve_from` issues this replica's serving certificate from a CA and
    makes TLS use it; /readyz reads `ready_check`.
    """

    secret: SecretStore
    webhooks: WebhookStore
    period: float
    serve_from: Callable[[SharedCa], None]
    metrics: Metrics | None = None
    serving: SharedCa | None = None
    problem: str | None = "caBundle not checked yet"
    _candidate: bytes | None = None
    _trusted_checks: int = 0
    _checked: float = field(default_factory=time.monotonic)

    @property
    def grace(self) -> dt.timedelta:
        return dt.timedelta(seconds=PREVIOUS_GRACE_CHECKS * self.period)

    async def start(self) -> SharedCa:
        """At startup: the CA (created or repaired if need be), and serving from it."""
        try:
            previous = (await self.webhooks.read()).certificates()
        except Exception as err:  # the Secret is what startup needs; the keeper retries
            log.warning("ca_bundle.read_failed", error=str(err))
            previous = []
        shared = await ensure_ca(self.secret, previous, self.grace, self.metrics)
        self.serve_from(shared)
        self.serving = shared
        return shared

    async def check_once(self) -> None:
        try:
            await self._check()
            self._checked = time.monotonic()
        except Exception as err:
            log.warning("ca.check_failed", error=str(err))

    async def _check(self) -> None:
        assert self.serving is not None, "start() first"
        try:
            hooks = await self.webhooks.read()  # before the Secret: see WebhookStore.set_bundle
        except client.exceptions.ApiException as err:
            self.problem = f"cannot read the webhook configuration: {err.status} {err.reason}"
            raise
        previous = [*hooks.certificates(), self.serving.ca_pem]
        shared = await ensure_ca(self.secret, previous, self.grace, self.metrics)
        wanted = shared.trusted()
        if shared.ca_pem != self.serving.ca_pem:
            self._move_towards(shared, hooks)
            if shared.ca_pem != self.serving.ca_pem and self.serving.ca_pem not in wanted:
                wanted.append(self.serving.ca_pem)  # still served here: still trusted
        else:
            self.serving = shared
            self._candidate, self._trusted_checks = None, 0
        bundle = b"".join(wanted)
        trusted = hooks
        if any(have != bundle for have in hooks.bundles):
            try:
                await self.webhooks.set_bundle(bundle, hooks)
            except Conflict:
                log.info("ca_bundle.conflict", note="another replica patched first; next check")
            else:
                trusted = WebhookBundles("", tuple(bundle for _ in hooks.bundles))
                if self.metrics is not None:
                    self.metrics.ca_bundle_patches.inc()
                log.info("ca_bundle.patched", webhooks=len(hooks.bundles), cas=len(wanted))
        if not trusted.bundles:
            self.problem = "the webhook configuration has no webhooks"
        elif not trusted.all_trust(self.serving.ca_pem):
            self.problem = "the caBundle does not trust our CA yet"
        else:
            self.problem = None

    def _move_towards(self, shared: SharedCa, hooks: WebhookBundles) -> None:
        """Serve from the Secret's new CA once the caBundle has trusted it for a while."""
        if not hooks.all_trust(shared.ca_pem):
            self._candidate, self._trusted_checks = shared.ca_pem, 0
            return
        if self._candidate != shared.ca_pem:
            self._candidate, self._trusted_checks = shared.ca_pem, 0
        self._trusted_checks += 1
        if self._trusted_checks < TRUSTED_CHECKS_BEFORE_SERVING:
            return
        self.serve_from(shared)
        self.serving = shared
        self._candidate, self._trusted_checks = None, 0
        if self.metrics is not None:
            self.metrics.ca_switches.inc()
        log.info("ca.switched", secret=str(self.secret))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            await self.check_once()

    async def ready_check(self) -> str | None:
        # A verdict nobody could refresh for several periods is no verdict.
        stale_after = 5 * self.period
        if time.monotonic() - self._checked > stale_after:
            return f"caBundle not checked for {stale_after:.0f}s (apiserver unreachable?)"
        return self.problem


CA_KEEPER = web.AppKey("ca_keeper", CaKeeper)


def write_serving_files(
    config: InjectorConfig, ca_pem: bytes, ca_key_pem: bytes, extra_hosts: list[str]
) -> CertFiles:
    cert_dir = Path(config.server.cert_dir)
    files = CertFiles(
        cert_dir / config.server.cert_file,
        cert_dir / config.server.key_file,
        cert_dir / config.server.ca_file,
    )
    hosts = service_hosts(config.webhook.service_name, config.webhook.namespace, extra_hosts)
    cert_pem, key_pem = issue_serving_cert(ca_pem, ca_key_pem, hosts)
    write_atomic(cert_dir / "ca.key", ca_key_pem)
    write_atomic(files.ca, ca_pem, 0o644)
    write_atomic(files.key, key_pem)
    write_atomic(files.cert, cert_pem, 0o644)
    return files


def shared_ca(config: InjectorConfig, extra_hosts: list[str] | None = None) -> CleanupContext:
    """At startup: the replicas' shared CA, this replica's serving files, the caBundle.

    Runs before the serving certificate is loaded (the files it writes are
    the ones served); then follows the Secret and keeps the caBundle patched
    until cleanup, and makes /readyz depend on it.
    """
    hosts = ["localhost", "127.0.0.1", *(extra_hosts or [])]

    async def context(app: web.Application) -> AsyncIterator[None]:
        api = app[KUBE_API]

        def serve_from(shared: SharedCa) -> None:
            write_serving_files(config, shared.ca_pem, shared.ca_key_pem, hosts)
            tls = app.get(TLS)
            if tls is not None:  # at startup the serving certificate loads these files next
                reload_if_changed(tls, app[METRICS])

        keeper = CaKeeper(
            KubeSecretStore(api, config),
            KubeWebhookStore(api, config),
            config.webhook.ca_bundle_check_seconds,
            serve_from,
            app[METRICS],
        )
        await keeper.start()
        await keeper.check_once()
        app[CA_KEEPER] = keeper
        app[READY_CHECKS].append(keeper.ready_check)
        async with background(keeper.run()):
            yield

    return context
