"""The CA the replicas share, as the Secret holds it, and what each side may do with it.

A pure model: the Secret's contents (`StoredSecret`), the CA parsed from them
(`SharedCa`: the current CA, and the ones it replaced that are still
trusted), the caBundles as read (`WebhookBundles`), and the two store
protocols the keeper (`ca_keeper.py`) is written against. The API's stores
are `ca_secret.py` and `webhook_ca_bundle.py`; the tests' are in memory.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from injector.pki.authority import ca_problem, generate_ca, split_certificates, valid_certificates

CA_CERT_KEY = "ca.crt"
CA_KEY_KEY = "ca.key"
PREVIOUS_KEY = "previous-ca.crt"
PREVIOUS_UNTIL = "juicefs.bentoml.com/previous-ca-until"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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


def secret_contents(shared: SharedCa) -> tuple[dict[str, bytes], dict[str, str]]:
    """What the Secret holds for a CA: its data, and the annotation on the previous CAs."""
    data = {CA_CERT_KEY: shared.ca_pem, CA_KEY_KEY: shared.ca_key_pem}
    annotations: dict[str, str] = {}
    if shared.previous and shared.previous_until is not None:
        data[PREVIOUS_KEY] = b"".join(shared.previous)
        annotations[PREVIOUS_UNTIL] = shared.previous_until.isoformat(timespec="seconds")
    return data, annotations
