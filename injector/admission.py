"""AdmissionReview v1: the envelope as typed models, the pod as a plain dict.

`review()` is the whole webhook decision without I/O or state: parse, check
the pod's shape, decide, mutate, answer. The server, the `render`
command and the tests all call it. It never raises on what a request holds:
whatever reaches /mutate gets an answer that says what is wrong with it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import to_json

from injector import podshape
from injector.config import InjectorConfig
from injector.mutation import mutate
from injector.patch import PatchOp
from injector.plan import Deny, Skip, decide, shown

API_VERSION = "admission.k8s.io/v1"

Outcome = Literal["injected", "unchanged", "skipped", "denied"]


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


class GroupVersionKind(_Envelope):
    group: str = ""
    version: str
    kind: str


class GroupVersionResource(_Envelope):
    group: str = ""
    version: str
    resource: str


class AdmissionRequest(_Envelope):
    uid: str = Field(min_length=1)
    kind: GroupVersionKind
    resource: GroupVersionResource | None = None
    sub_resource: str | None = Field(default=None, alias="subResource")
    operation: str
    namespace: str | None = None
    name: str | None = None
    # The pod stays a dict: re-serialising it through a model would drop
    # fields the model does not know.
    object: dict[str, Any] | None = None
    dry_run: bool = Field(default=False, alias="dryRun")

    @field_validator("object")
    @classmethod
    def _object_metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """The object's metadata names it in every log line: it must be an object of strings."""
        metadata = (value or {}).get("metadata")
        if metadata is None:
            return value
        if not isinstance(metadata, dict):
            raise ValueError("metadata must be an object")
        for key in ("name", "generateName", "namespace"):
            if key in metadata and not isinstance(metadata[key], str):
                raise ValueError(f"metadata.{key} must be a string")
        return value


class AdmissionReview(_Envelope):
    api_version: Literal["admission.k8s.io/v1"] = Field(alias="apiVersion")
    kind: Literal["AdmissionReview"]
    request: AdmissionRequest


class BadReview(ValueError):
    """The body is not an AdmissionReview v1 request; the message says why."""


def _describe(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"])
        if item["type"] == "missing":
            parts.append(f"{where} is missing")
        elif item["type"] == "literal_error":
            parts.append(f"{where} must be {item['ctx']['expected']}, got {shown(item['input'])}")
        else:
            parts.append(f"{where}: {item['msg']}")
    return "not an AdmissionReview admission.k8s.io/v1 request: " + "; ".join(parts)


def parse_review(body: bytes) -> AdmissionReview:
    try:
        return AdmissionReview.model_validate_json(body)
    except ValidationError as err:
        invalid = [item for item in err.errors() if item["type"] == "json_invalid"]
        if invalid:
            # e.g. "EOF while parsing a value at line 1 column 2", "recursion limit exceeded"
            reason = str(invalid[0].get("ctx", {}).get("error") or invalid[0]["msg"])
            raise BadReview(f"request body is not valid JSON: {reason}") from None
        raise BadReview(_describe(err)) from None


@dataclass(frozen=True)
class ReviewResult:
    outcome: Outcome
    reason: str
    response: dict[str, Any]
    ops: list[PatchOp]
    warnings: list[str]


def _answer(
    uid: str,
    *,
    allowed: bool,
    ops: list[PatchOp] | None = None,
    warnings: list[str] | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if ops:
        response["patchType"] = "JSONPatch"
        # pydantic-core's encoder: the same JSON as json.dumps, compact, 4x faster.
        response["patch"] = base64.b64encode(to_json(ops)).decode()
    if warnings:
        response["warnings"] = warnings
    if message is not None:
        response["status"] = {"code": 400, "reason": "BadRequest", "message": message}
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def _skip(uid: str, reason: str) -> ReviewResult:
    return ReviewResult("skipped", reason, _answer(uid, allowed=True), [], [])


def _deny(uid: str, message: str) -> ReviewResult:
    message = f"JuiceFS model injection: {message}"
    return ReviewResult("denied", message, _answer(uid, allowed=False, message=message), [], [])


def review(request: AdmissionRequest, config: InjectorConfig) -> ReviewResult:
    """The answer to one AdmissionReview request: a function of the request and the config.

    No namespace's Pod Security level is consulted: what the injector adds
    passes `restricted`, so Pod Security judges only the pod's own containers,
    as for any pod.
    """
    uid = request.uid
    kind = request.kind
    if (kind.group, kind.kind) != ("", "Pod") or request.sub_resource:
        return _skip(
            uid,
            f"not a pod: {kind.group or 'core'}/{kind.kind} {request.sub_resource or ''}".strip(),
        )
    if request.operation != "CREATE":
        return _skip(uid, f"operation {request.operation} is not CREATE")
    pod = request.object
    if not isinstance(pod, dict):
        return _deny(
            uid,
            "pod CREATE request carries no object to mutate: expected the Pod in request.object",
        )
    if problems := podshape.metadata_problems(pod):
        return _deny(uid, podshape.describe(problems))
    namespace = request.namespace or (pod.get("metadata") or {}).get("namespace") or "default"

    decision = decide(pod, namespace, config)
    if isinstance(decision, Skip):
        return _skip(uid, decision.reason)
    if isinstance(decision, Deny):
        return _deny(uid, decision.message)
    if problems := podshape.spec_problems(pod):
        return _deny(uid, podshape.describe(problems))

    result = mutate(pod, decision, config)
    if result.conflicts:
        return _deny(uid, "; ".join(result.conflicts))
    outcome: Outcome = "injected" if result.ops else "unchanged"
    reason = "already injected" if decision.already_injected else "injected"
    if decision.already_injected and result.ops:
        reason = "re-invoked: added what was missing"
    response = _answer(uid, allowed=True, ops=result.ops, warnings=result.warnings)
    return ReviewResult(outcome, reason, response, result.ops, result.warnings)


def pod_review_request(
    pod: dict[str, Any], namespace: str, uid: str = "render", dry_run: bool = True
) -> AdmissionRequest:
    """A CREATE request for pod, as the apiserver would send it (used by render).

    Built without validation: a pod whose metadata the envelope would refuse
    still reaches `review()`, which denies it naming the field.
    """
    metadata = pod.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return AdmissionRequest.model_construct(
        uid=uid,
        kind=GroupVersionKind(group="", version="v1", kind="Pod"),
        resource=GroupVersionResource(group="", version="v1", resource="pods"),
        sub_resource=None,
        operation="CREATE",
        namespace=namespace,
        name=name if isinstance(name, str) else None,
        object=pod,
        dry_run=dry_run,
    )
