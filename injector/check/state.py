"""What the checks read: the API objects as served (plain dicts), fetched once.

`fetch.py` fills a `ClusterState`; every check is a function of parts of it.
The small readers here take an object apart without trusting its shape: a
field missing or of another type reads as absent.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Unreadable:
    """An object the check could not read (forbidden, or an API error): why."""

    reason: str


@dataclass(frozen=True)
class Probe:
    """A TLS handshake with one of the webhook's endpoints: the leaf it presented, or why not."""

    address: str
    server_name: str
    leaf_pem: bytes | None = None
    error: str | None = None


@dataclass(frozen=True)
class Endpoints:
    """Where the apiserver calls the webhook, and what answered there.

    kind "url": clientConfig.url; "service": a Service, whose ready
    endpoints (`ready`, None when they could not be read) were probed.
    """

    kind: Literal["url", "service", "none"]
    target: str
    server_name: str
    ready: int | None = None
    probes: tuple[Probe, ...] = ()


@dataclass
class ClusterState:
    """Everything the checks read, fetched once."""

    version: Obj
    nodes: list[Obj] | Unreadable
    namespaces: list[Obj] | Unreadable
    webhook: Obj | Unreadable | None
    ca_secret: Obj | Unreadable | None
    endpoints: Endpoints
    # Credentials Secret name -> the Secret in the injector's namespace.
    sources: dict[str, Obj | Unreadable | None] = field(default_factory=dict)
    # (namespace, Secret name) -> the copy in an opted-in namespace.
    copies: dict[tuple[str, str], Obj | Unreadable | None] = field(default_factory=dict)
    daemonset: Obj | Unreadable | None = None
    agent_pods: list[Obj] | Unreadable = field(default_factory=list)
    # Opted-in namespace -> its pods with the Bento label (model-store=juicefs).
    bento_pods: dict[str, list[Obj] | Unreadable] = field(default_factory=dict)


def dig(obj: Any, *keys: str) -> Any:
    """obj[keys[0]][keys[1]]...; None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def name_of(obj: Obj) -> str:
    return str(dig(obj, "metadata", "name") or "")


def labels_of(obj: Obj) -> dict[str, str]:
    return dict(dig(obj, "metadata", "labels") or {})


def secret_bytes(secret: Obj, key: str) -> bytes | None:
    """A Secret's value decoded: None when the key is absent, b"" when it is not base64."""
    value = (secret.get("data") or {}).get(key)
    if value is None:
        return None
    try:
        return base64.b64decode(value)
    except ValueError:
        return b""


def secret_keys(secret: Obj) -> list[str]:
    """The names of a Secret's keys, sorted: what a row may show of it."""
    return sorted((secret.get("data") or {}).keys())
