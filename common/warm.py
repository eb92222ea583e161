"""The contract between the node agent and the injector: how a node says which models are warm.

The node agent keeps its node's cache warm and records the result on its own
Node object, in two forms:

- one label per warm Bento, for the scheduler: key `warm.juicefs.bentoml.com/<name>.<version>`
  (shortened with a digest when it would not fit a label key), value the
  JuiceFS volume it was warmed from. The injector adds a preferred node
  affinity term `key In [volume]`, so a pod of that Bento goes to a warm node
  when one has room. The label is there only while every byte of the Bento's
  selected models is in the node cache and was verified against its manifest.
- the annotation `juicefs.bentoml.com/warm-models`: a JSON list with one
  entry per Bento the agent knows about on this node (warm, warming, failed,
  over budget, evicted), with bytes, whether verified, and when, for people
  (`kubectl describe node`).

Both are written only by the agent of that node (a ValidatingAdmissionPolicy
fences its service account to its own Node and to these keys).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

WARM_LABEL_PREFIX = "warm.juicefs.bentoml.com/"
WARM_ANNOTATION = "juicefs.bentoml.com/warm-models"
# The opt-in startup taint: a node pool created with it takes no Bento pod
# until the agent of each node removes it, once the Bentos deployed for the
# node are warm there (the agent tolerates it; its fence lets it remove only it).
STARTUP_TAINT = "juicefs.bentoml.com/models-not-warm"
# The agent's Events about its node go where the kubelet's go, so that
# `kubectl describe node` lists them.
NODE_EVENTS_NAMESPACE = "default"
AGENT_COMPONENT = "bento-juicefs-node-agent"

_LABEL_NAME_MAX = 63
_LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DIGEST_CHARS = 10

WarmState = Literal["warm", "warming", "failed", "over-budget", "evicted"]
WARM_STATES: tuple[WarmState, ...] = get_args(WarmState)


def warm_label_key(bento_name: str, bento_version: str) -> str:
    """The node label that says Bento name:version is warm on the node.

    `<name>.<version>` when that is a valid label name (63 characters at
    most); otherwise as much of it as fits with a digest of the whole, so two
    Bentos never share a key.
    """
    readable = f"{bento_name}.{bento_version}"
    if len(readable) <= _LABEL_NAME_MAX and _LABEL_NAME_RE.match(readable):
        return WARM_LABEL_PREFIX + readable
    digest = hashlib.sha256(readable.encode()).hexdigest()[:_DIGEST_CHARS]
    head = re.sub(r"[^-A-Za-z0-9_.]", "-", readable)[: _LABEL_NAME_MAX - _DIGEST_CHARS - 1]
    return f"{WARM_LABEL_PREFIX}{head.rstrip('-_.')}.{digest}"


def is_warm_label(key: str) -> bool:
    return key.startswith(WARM_LABEL_PREFIX)


@dataclass(frozen=True, order=True)
class BentoRef:
    """A Bento version in a JuiceFS volume: what the node cache holds models of."""

    volume: str
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}:{self.version} ({self.volume})"

    @property
    def label_key(self) -> str:
        return warm_label_key(self.name, self.version)


@dataclass(frozen=True)
class WarmRecord:
    """One annotation entry: what the node cache holds of one Bento, and since when."""

    bento: BentoRef
    state: WarmState
    bytes: int = 0
    verified: bool = False
    # ISO 8601 UTC of the last change of state.
    at: str = ""
    # The models of the Bento it covers (empty: all of them).
    models: tuple[str, ...] = ()
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["bento"] = f"{self.bento.name}:{self.bento.version}"
        out["volume"] = self.bento.volume
        out["models"] = list(self.models)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WarmRecord:
        name, _, version = str(data["bento"]).partition(":")
        state = data["state"]
        if state not in WARM_STATES or not name or not version:
            raise ValueError(f"not a warm-models entry: {data!r}")
        return cls(
            bento=BentoRef(str(data["volume"]), name, version),
            state=state,
            bytes=int(data.get("bytes", 0)),
            verified=bool(data.get("verified", False)),
            at=str(data.get("at", "")),
            models=tuple(str(m) for m in data.get("models", ())),
            message=str(data.get("message", "")),
        )


@dataclass(frozen=True)
class NodeWarmth:
    """A node's whole record: the annotation's entries, by Bento."""

    records: dict[BentoRef, WarmRecord] = field(default_factory=dict)

    def render(self) -> str:
        entries = [self.records[ref].to_json() for ref in sorted(self.records)]
        return json.dumps(entries, separators=(",", ":"), sort_keys=True)

    @classmethod
    def parse(cls, text: str | None) -> NodeWarmth:
        """The record from the annotation; a missing or unreadable one is empty."""
        if not text:
            return cls()
        try:
            entries = json.loads(text)
            records = [WarmRecord.from_json(entry) for entry in entries]
        except (ValueError, TypeError, KeyError):
            return cls()
        return cls({record.bento: record for record in records})

    def labels(self) -> dict[str, str]:
        """The warm labels this record means: one per verified, warm Bento."""
        return {
            ref.label_key: ref.volume
            for ref, record in self.records.items()
            if record.state == "warm" and record.verified
        }
