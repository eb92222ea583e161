"""The CA keeper: a CA shared by replicas through a Secret, the caBundle kept in
the MutatingWebhookConfiguration trusting it, and a serving cert per replica.

The model is `shared_ca.py`; the API's Secret and caBundle are reached
through `ca_secret.py` and `webhook_ca_bundle.py`.

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
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import structlog
from aiohttp import web
from kubernetes_asyncio import client

from injector.config import InjectorConfig
from injector.kube import KUBE_API
from injector.lifecycle import READY_CHECKS, CleanupContext, background
from injector.metrics import METRICS, Metrics
from injector.pki.ca_secret import KubeSecretStore
from injector.pki.serving import TLS, reload_if_changed, write_serving_files
from injector.pki.shared_ca import (
    Conflict,
    SecretStore,
    SharedCa,
    WebhookBundles,
    WebhookStore,
    new_shared_ca,
    parse_shared_ca,
    secret_contents,
)
from injector.pki.webhook_ca_bundle import KubeWebhookStore

log = structlog.get_logger("injector.cluster_certs")

# The previous CA stays trusted this many checks after a new one is written.
PREVIOUS_GRACE_CHECKS = 10
# A new CA is served once the caBundle has trusted it at this many checks in a row.
TRUSTED_CHECKS_BEFORE_SERVING = 2


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
        data, annotations = secret_contents(fresh)
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
