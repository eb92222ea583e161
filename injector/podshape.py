"""The pod's shape, checked before anything reads it: every field the injector reads.

The apiserver only ever sends a typed Pod, but the webhook answers whatever
reaches /mutate, and the pod stays a plain dict (never a model, which would
drop fields it does not know). So before `decide()` and the mutation steps
read a field, this check makes sure each field they read has the type a
Kubernetes Pod gives it; a pod that does not is denied with the field's path
and the type expected, instead of failing inside the injector. Fields the
injector does not read are not looked at. A JSON null counts as absent, as
in the apiserver's own decoding, except as a list item.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# At most this many problems are reported: enough to fix, short enough to read.
MAX_PROBLEMS = 3


@dataclass(frozen=True)
class Required:
    """A field that must be present (and not null)."""

    schema: Any


STRING_MAP = "map of strings"

_EXPRESSIONS = [{"key": Required(str), "operator": str, "values": [str]}]
_TERM = {"matchExpressions": _EXPRESSIONS}
_CONTAINER = {
    "name": Required(str),
    "image": str,
    "restartPolicy": str,
    "volumeMounts": [
        {"name": Required(str), "mountPath": str, "readOnly": bool, "mountPropagation": str}
    ],
    "ports": [{"containerPort": int, "protocol": str}],
}
_VOLUME = {
    "name": Required(str),
    "emptyDir": dict,
    "hostPath": {"path": str, "type": str},
    "projected": {"sources": [{"serviceAccountToken": {"audience": str, "path": str}}]},
}

# What the injector reads, with the type a Kubernetes Pod (v1) gives it.
METADATA: dict[str, Any] = {
    "name": str,
    "generateName": str,
    "namespace": str,
    "labels": STRING_MAP,
    "annotations": STRING_MAP,
}
SPEC: dict[str, Any] = {
    "containers": [_CONTAINER],
    "initContainers": [_CONTAINER],
    "ephemeralContainers": [_CONTAINER],
    "volumes": [_VOLUME],
    "readinessGates": [{"conditionType": str}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [_TERM]},
            "preferredDuringSchedulingIgnoredDuringExecution": [{"preference": _TERM}],
        }
    },
    "hostNetwork": bool,
    "dnsPolicy": str,
    "restartPolicy": str,
    "automountServiceAccountToken": bool,
    "runtimeClassName": str,
}


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return "null"


def _expected(schema: Any) -> str:
    if isinstance(schema, Required):
        return _expected(schema.schema)
    if schema is str:
        return "a string"
    if schema is bool:
        return "true or false"
    if schema is int:
        return "a whole number"
    if schema is STRING_MAP:
        return "an object of string values"
    if isinstance(schema, list):
        inner = _expected(schema[0])
        return "a list of " + inner.removeprefix("a ").removeprefix("an ") + "s"
    return "an object"


def _fits(value: Any, schema: Any) -> bool:
    if schema is str:
        return isinstance(value, str)
    if schema is bool:
        return isinstance(value, bool)
    if schema is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if schema is STRING_MAP:
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    if isinstance(schema, list):
        return isinstance(value, list)
    return isinstance(value, dict)


def _walk(value: Any, schema: Any, path: str, problems: list[str], in_list: bool = False) -> None:
    if len(problems) >= MAX_PROBLEMS:
        return
    required = isinstance(schema, Required)
    if required:
        schema = schema.schema
    if value is None:
        if required or in_list:
            problems.append(f"{path} is missing: expected {_expected(schema)}")
        return
    if not _fits(value, schema):
        problems.append(f"{path} is {_kind(value)}: expected {_expected(schema)}")
        return
    if isinstance(schema, list):
        for index, item in enumerate(value):
            _walk(item, schema[0], f"{path}[{index}]", problems, in_list=True)
    elif isinstance(schema, dict):
        for key, sub in schema.items():
            _walk(value.get(key), sub, f"{path}.{key}", problems)


def metadata_problems(pod: Mapping[str, Any]) -> list[str]:
    """What is wrong with the pod's metadata (labels and annotations above all), if anything."""
    problems: list[str] = []
    _walk(pod.get("metadata"), METADATA, "metadata", problems)
    return problems


def spec_problems(pod: Mapping[str, Any]) -> list[str]:
    """What is wrong with the parts of the pod's spec the mutation reads, if anything."""
    problems: list[str] = []
    _walk(pod.get("spec"), SPEC, "spec", problems)
    return problems


def describe(problems: list[str]) -> str:
    return "the pod is not a well-formed Kubernetes Pod: " + "; ".join(problems)
