"""The shared CA and the caBundle, replica against replica, over in-memory stores.

The stores stand in for the Secret and the MutatingWebhookConfiguration with
the apiserver's semantics that matter here: create fails if it exists (409),
an update or a patch naming an old resourceVersion fails (409/422), and
every call yields to the event loop, so replicas interleave as they would.
The real apiserver runs the same scenarios in tests/e2e/test_injector_ha.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass, field

import pytest
from cryptography import x509

from injector.pki.authority import ca_problem, generate_ca, issue_cert, split_certificates
from injector.pki.ca_keeper import CaKeeper
from injector.pki.shared_ca import (
    CA_CERT_KEY,
    CA_KEY_KEY,
    PREVIOUS_KEY,
    PREVIOUS_UNTIL,
    Conflict,
    SharedCa,
    StoredSecret,
    WebhookBundles,
    parse_shared_ca,
)


@dataclass
class FakeCluster:
    secret: StoredSecret | None = None
    bundles: list[bytes] = field(default_factory=lambda: [b""])
    secret_version: int = 0
    webhook_version: int = 0
    secret_writes: list[str] = field(default_factory=list)
    bundle_patches: int = 0
    history: list[tuple[bytes, ...]] = field(default_factory=list)

    def put_secret(self, data: dict[str, bytes], annotations: dict[str, str] | None = None) -> None:
        self.secret_version += 1
        self.secret = StoredSecret(data, annotations or {}, str(self.secret_version))

    def ca(self) -> bytes:
        assert self.secret is not None
        return self.secret.data[CA_CERT_KEY]


class FakeSecretStore:
    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster

    def __str__(self) -> str:
        return "bento-juicefs-system/bento-juicefs-injector-ca"

    async def read(self) -> StoredSecret | None:
        await asyncio.sleep(0)
        return self.cluster.secret

    async def create(self, data: dict[str, bytes], annotations: dict[str, str]) -> None:
        await asyncio.sleep(0)
        if self.cluster.secret is not None:
            raise Conflict("exists")
        self.cluster.put_secret(data, annotations)
        self.cluster.secret_writes.append("create")

    async def replace(
        self, data: dict[str, bytes], annotations: dict[str, str], resource_version: str
    ) -> None:
        await asyncio.sleep(0)
        current = self.cluster.secret
        if current is None or current.resource_version != resource_version:
            raise Conflict("changed")
        self.cluster.put_secret(data, annotations)
        self.cluster.secret_writes.append("replace")


class FakeWebhookStore:
    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster

    async def read(self) -> WebhookBundles:
        await asyncio.sleep(0)
        return WebhookBundles(str(self.cluster.webhook_version), tuple(self.cluster.bundles))

    async def set_bundle(self, bundle: bytes, current: WebhookBundles) -> None:
        await asyncio.sleep(0)
        if current.resource_version != str(self.cluster.webhook_version):
            raise Conflict("resourceVersion test failed")
        self.cluster.bundles = [bundle for _ in self.cluster.bundles]
        self.cluster.webhook_version += 1
        self.cluster.bundle_patches += 1
        self.cluster.history.append(tuple(self.cluster.bundles))


@dataclass
class Replica:
    """A CaKeeper whose serve_from records what it served and what the caBundle trusted."""

    cluster: FakeCluster
    period: float = 1.0
    served: list[bytes] = field(default_factory=list)
    keeper: CaKeeper = field(init=False)

    def __post_init__(self) -> None:
        self.keeper = CaKeeper(
            FakeSecretStore(self.cluster),
            FakeWebhookStore(self.cluster),
            self.period,
            self._serve_from,
        )

    def _serve_from(self, shared: SharedCa) -> None:
        if self.served:
            # Never serve a CA the apiserver does not trust yet.
            assert all(shared.ca_pem in split_certificates(b) for b in self.cluster.bundles), (
                "served a CA before the caBundle trusted it"
            )
        self.served.append(shared.ca_pem)

    @property
    def ca(self) -> bytes:
        assert self.keeper.serving is not None
        return self.keeper.serving.ca_pem


def trusted(cluster: FakeCluster) -> list[list[bytes]]:
    return [split_certificates(b) for b in cluster.bundles]


async def checks(replicas: list[Replica], rounds: int) -> None:
    for _ in range(rounds):
        await asyncio.gather(*(r.keeper.check_once() for r in replicas))


async def test_two_replicas_at_once_against_no_secret_agree_and_patch_once() -> None:
    cluster = FakeCluster(bundles=[b"", b""])  # two webhooks in the configuration
    a, b = Replica(cluster), Replica(cluster)
    await asyncio.gather(a.keeper.start(), b.keeper.start())
    assert cluster.secret_writes == ["create"]
    assert a.ca == b.ca == cluster.ca()
    await checks([a, b], 5)
    assert cluster.bundle_patches == 1
    assert trusted(cluster) == [[cluster.ca()], [cluster.ca()]]
    assert await a.keeper.ready_check() is None
    assert await b.keeper.ready_check() is None


async def test_two_replicas_at_once_against_an_empty_secret() -> None:
    cluster = FakeCluster()
    cluster.put_secret({})
    a, b = Replica(cluster), Replica(cluster)
    await asyncio.gather(a.keeper.start(), b.keeper.start())
    assert cluster.secret_writes == ["replace"]
    assert a.ca == b.ca == cluster.ca()
    await checks([a, b], 4)
    assert cluster.bundle_patches == 1


@pytest.mark.parametrize("damage", ["deleted", "emptied", "corrupt", "wrong-key", "not-a-ca"])
async def test_a_broken_secret_is_repaired_once_and_every_replica_moves_without_a_gap(
    damage: str,
) -> None:
    cluster = FakeCluster()
    replicas = [Replica(cluster) for _ in range(3)]
    await asyncio.gather(*(r.keeper.start() for r in replicas))
    await checks(replicas, 2)
    old = cluster.ca()
    assert cluster.bundle_patches == 1

    other_ca, other_key = generate_ca()
    assert cluster.secret is not None
    data = dict(cluster.secret.data)
    if damage == "deleted":
        cluster.secret = None
    elif damage == "emptied":
        cluster.put_secret({})
    elif damage == "corrupt":
        cluster.put_secret({**data, CA_CERT_KEY: b"-----BEGIN CERTIFICATE-----\ngarbage"})
    elif damage == "wrong-key":
        cluster.put_secret({**data, CA_KEY_KEY: other_key})
    else:
        leaf, leaf_key = issue_cert(other_ca, other_key, "not-a-ca")
        cluster.put_secret({CA_CERT_KEY: leaf, CA_KEY_KEY: leaf_key})
    writes = len(cluster.secret_writes)

    # Every check, every replica: the caBundle always trusts what each one serves.
    for _ in range(6):
        await checks(replicas, 1)
        for replica in replicas:
            assert all(replica.ca in certs for certs in trusted(cluster))
    new = cluster.ca()
    assert new != old
    assert len(cluster.secret_writes) == writes + 1  # one replica repaired it
    assert {r.ca for r in replicas} == {new}
    assert all(r.served[-1] == new for r in replicas)
    assert trusted(cluster) == [[new, old]]  # the old CA is trusted for the grace period
    assert cluster.secret is not None
    assert cluster.secret.data[PREVIOUS_KEY] == old

    # After the grace, only the new CA.
    until = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    cluster.put_secret(dict(cluster.secret.data), {PREVIOUS_UNTIL: until.isoformat()})
    await checks(replicas, 2)
    assert trusted(cluster) == [[new]]
    for replica in replicas:
        assert await replica.keeper.ready_check() is None


async def test_a_replaced_ca_is_served_only_after_the_bundle_trusted_it_at_two_checks() -> None:
    cluster = FakeCluster()
    replica = Replica(cluster)
    await replica.keeper.start()
    await checks([replica], 1)
    old = cluster.ca()
    cluster.secret = None
    await checks([replica], 1)  # recreates the Secret, adds the new CA to the bundle
    new = cluster.ca()
    assert trusted(cluster) == [[new, old]]
    assert replica.ca == old
    await checks([replica], 1)  # the bundle trusted it once
    assert replica.ca == old
    await checks([replica], 1)  # twice: serve it
    assert replica.ca == new
    assert replica.served == [old, new]


async def test_a_ca_replaced_by_hand_is_adopted_and_the_old_one_trusted_until_moved() -> None:
    cluster = FakeCluster()
    a, b = Replica(cluster), Replica(cluster)
    await asyncio.gather(a.keeper.start(), b.keeper.start())
    await checks([a, b], 1)
    old = cluster.ca()
    ca, key = generate_ca()
    cluster.put_secret({CA_CERT_KEY: ca, CA_KEY_KEY: key})  # no previous recorded
    for _ in range(4):
        await checks([a, b], 1)
        for replica in (a, b):
            assert all(replica.ca in certs for certs in trusted(cluster))
    assert a.ca == b.ca == ca
    assert trusted(cluster) == [[ca]]
    assert old not in trusted(cluster)[0]


async def test_a_stale_replica_cannot_undo_a_newer_bundle() -> None:
    cluster = FakeCluster()
    replica = Replica(cluster)
    await replica.keeper.start()
    await checks([replica], 1)
    stale = await FakeWebhookStore(cluster).read()
    cluster.bundles = [b"someone else's newer bundle"]
    cluster.webhook_version += 1
    with pytest.raises(Conflict):
        await FakeWebhookStore(cluster).set_bundle(replica.ca, stale)


async def test_a_reset_bundle_is_patched_back_and_readiness_follows() -> None:
    cluster = FakeCluster()
    replica = Replica(cluster)
    await replica.keeper.start()
    await checks([replica], 1)
    assert await replica.keeper.ready_check() is None
    cluster.bundles = [b""]  # a chart upgrade or a GitOps sync
    cluster.webhook_version += 1
    await checks([replica], 1)
    assert trusted(cluster) == [[replica.ca]]
    assert await replica.keeper.ready_check() is None


async def test_an_expiring_ca_is_replaced() -> None:
    ca, key = generate_ca()
    cert = x509.load_pem_x509_certificate(ca)
    late = cert.not_valid_after_utc - dt.timedelta(days=30)
    stored = StoredSecret({CA_CERT_KEY: ca, CA_KEY_KEY: key}, {}, "1")
    assert parse_shared_ca(stored)[0] is not None
    problem = ca_problem(ca, key, now=late)
    assert problem is not None
    assert "expires" in problem


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, "lacks ca.crt or ca.key"),
        ({CA_CERT_KEY: b"x", CA_KEY_KEY: b"y"}, "not a PEM certificate"),
        ("wrong-key", "does not belong"),
        ("leaf", "not a CA"),
    ],
)
def test_what_is_wrong_with_a_secret_is_named(data: object, expected: str) -> None:
    ca, key = generate_ca()
    if data == "wrong-key":
        data = {CA_CERT_KEY: ca, CA_KEY_KEY: generate_ca()[1]}
    elif data == "leaf":
        leaf, leaf_key = issue_cert(ca, key, "leaf")
        data = {CA_CERT_KEY: leaf, CA_KEY_KEY: leaf_key}
    assert isinstance(data, dict)
    shared, problem = parse_shared_ca(StoredSecret(data, {}, "1"))
    assert shared is None
    assert problem is not None
    assert expected in problem
