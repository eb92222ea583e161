"""Fuzzing the admission path: what every input must lead to, and the inputs.

Each target takes one input and checks the invariants below, raising
AssertionError on a violation (any other exception is a crash); it returns
what happened, for the counts. `tests/test_fuzz.py` runs every target with a
small hypothesis budget in the normal test run; `python -m tests.fuzzing`
(`make fuzz`) runs them with the big one, over real HTTPS too, and with
atheris when it is installed, and writes bench-results/fuzz.json.

The invariants, for every input:
- no exception but the parsers' own ValueError (the server would answer 500);
- an AdmissionReview that parses gets an answer for its uid, as JSON;
- a denial names the field: a pod whose labels or annotations break a rule
  is denied with the key and what is accepted (`expected ...`);
- an injected pod's patch applies, applying it again changes nothing, and
  it opens no escape: every volume it adds is an emptyDir (no hostPath,
  not even the node cache: the node agent mounts that), the credentials
  are `secretKeyRef`s to the allowed volumes' Secrets only, and the
  Bento's directory stays under the models tree.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import http.client
import importlib.util
import json
import logging
import os
import posixpath
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonpatch
import structlog
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic_core import to_json

from common import env
from common.ports import free_port, port_answers
from injector.admission import BadReview, parse_review, pod_review_request, review
from injector.config import InjectorConfig, parse_config
from injector.quantity import (
    DurationError,
    QuantityError,
    parse_duration_seconds,
    parse_quantity,
)
from injector.review_cache import ReviewCache
from tests.helpers import GOLDEN_CASES, bento_pod, pods_of

REPO = Path(__file__).resolve().parent.parent
PREFIX = "JuiceFS model injection: "
INTERNAL_ERROR = "failed inside the injector"

# Configs the targets run under: the default (GKE, node cache, native
# sidecar), the pod cache, an old cluster with no profile, two volumes, and
# our volumes under other names.
CONFIGS: dict[str, InjectorConfig] = {
    "default": InjectorConfig(),
    "pod-cache": parse_config({"cache": {"mode": "pod"}}),
    "classic": parse_config(
        {
            "cluster": {"kubernetesVersion": "1.28", "platformProfile": "none"},
            "scheduling": {"ssdPolicy": "off"},
        }
    ),
    "two-volumes": parse_config({"juicefs": {"allowedVolumes": ["models", "team-a"]}}),
    "renamed-volumes": parse_config(
        {"volumes": {"mountDirName": "models-dir", "cacheName": "cache", "agentName": "agent"}}
    ),
}
DEFAULT = CONFIGS["default"]
ANN = DEFAULT.annotations
LABELS = DEFAULT.labels
ANNOTATION_KEYS = [
    ANN.models,
    ANN.volume,
    ANN.cache_size,
    ANN.cache_mode,
    ANN.ssd_policy,
    ANN.sidecar_cpu,
    ANN.sidecar_memory,
    ANN.sidecar_cpu_limit,
    ANN.sidecar_memory_limit,
    ANN.warmup,
    ANN.warmup_timeout,
]
LABEL_KEYS = [LABELS.inject, LABELS.bento_repository, LABELS.bento_version]

# Strings that have broken parsers before, or that an attacker would try.
TRICKY = [
    "",
    " ",
    ".",
    "..",
    "../..",
    "../../etc/passwd",
    "/",
    "/etc/shadow",
    "/var/lib/kubelet/pods",
    "a/../../b",
    "./x",
    "~root",
    "$HOME",
    "${HOME}",
    "$(id)",
    "`id`",
    "%2e%2e%2f",
    "\x00",
    "a\x00b",
    "\n",
    "llama\n",
    "llama3\n:v1",
    "\u202ellama",
    "true",
    "false",
    "True",
    "TRUE",
    " true",
    "yes",
    "0",
    "1",
    "-1",
    "+1",
    "1e18",
    "1e19",
    "1E3",
    "1e-9",
    "0.5",
    ".5",
    "5.",
    "20Gi",
    " 20Gi",
    "20Gi ",
    "20Gi\n",
    "20 Gi",
    "20GiB",
    "1Ti",
    "2Ti",
    "3Ti",
    "99999999999999999999999999999Ei",
    "9" * 40,
    "1Ki",
    "0Gi",
    "-20Gi",
    "1.5Ki",
    "1n",
    "NaN",
    "inf",
    "Infinity",
    "30s",
    "29s",
    "24h",
    "24h1s",
    "1h30m",
    "1h 30m",
    "\u0663\u0660s",
    "\uff13\uff10s",
    "900",
    "1.5h",
    "999999h",
    "node",
    "pod",
    "Node",
    "required",
    "preferred",
    "off",
    "models",
    "team-a",
    "other-team",
    "juicefs-models-credentials",
    "kube-system/juicefs-models-credentials",
    "llama3:v1",
    "llama3:v1,tokenizer",
    "llama3:",
    ":v1",
    "a,,b",
    "a, b",
    "Llama",
    "a" * 63,
    "a" * 64,
    "v" * 128,
    "v" * 129,
    "é",
    "x" * 5000,
]

texts = st.text(max_size=80)
tricky = st.sampled_from(TRICKY)
plausible = st.from_regex(
    r"[A-Za-z0-9./:, _-]{0,20}|[0-9.]{1,8}(Ki|Mi|Gi|Ti|[mkMGT]|e[0-9])?|[0-9]{1,4}[hms]",
    fullmatch=True,
)
values = st.one_of(tricky, texts, plausible)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), values
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


# -- invariants ---------------------------------------------------------------------------------


@dataclass
class Seen:
    """Counts of what the inputs led to, per target."""

    counts: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, target: str, outcome: str) -> None:
        self.counts.setdefault(target, Counter())[outcome] += 1

    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())


SEEN = Seen()


def _sidecar(pod: dict[str, Any], config: InjectorConfig) -> dict[str, Any]:
    for key in ("initContainers", "containers"):
        for container in pod["spec"].get(key) or []:
            if container.get("name") == config.sidecar.container_name:
                return dict(container)
    raise AssertionError("injected pod has no sidecar")


def check_no_escape(
    original: dict[str, Any], patched: dict[str, Any], config: InjectorConfig
) -> None:
    """What an injected pod got opens no way out of its boundaries."""
    allowed = config.juicefs.allowed_volumes
    before = {
        v.get("name")
        for v in (original.get("spec") or {}).get("volumes") or []
        if isinstance(v, dict)
    }
    for volume in patched["spec"].get("volumes") or []:
        if volume.get("name") in before:
            continue  # the pod's own, as it was
        assert set(volume) == {"name", "emptyDir"}, f"volume escape: {volume}"
    secrets = {config.juicefs.secret_name_template.format(volume=v) for v in allowed}
    sidecar = _sidecar(patched, config)
    by_name = {}
    for entry in sidecar["env"]:
        by_name[entry["name"]] = entry
        ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
        if ref is not None:
            assert ref["name"] in secrets, f"secret escape: {ref}"
            assert set(ref) <= {"name", "key", "optional"}, ref
    for name in (env.META_URL.name, env.ACCESS_KEY.name, env.SECRET_KEY.name):
        assert "value" not in by_name[name], f"{name} is a literal"
        assert "secretKeyRef" in by_name[name]["valueFrom"], name
    bento_path = by_name[env.BENTO_PATH.name]["value"]
    root = config.models.juicefs_path_template.split("{", 1)[0].rstrip("/")
    assert posixpath.normpath(bento_path) == bento_path, bento_path
    assert bento_path.startswith(root + "/"), bento_path
    assert ".." not in bento_path.split("/"), bento_path
    for part in (by_name[env.BENTO_NAME.name]["value"], by_name[env.BENTO_VERSION.name]["value"]):
        assert "/" not in part, part
        assert part not in (".", ".."), part
    for tag in filter(None, by_name[env.MODELS.name]["value"].split(",")):
        name, _, version = tag.partition(":")
        assert env.is_bento_name(name), tag
        assert not version or env.is_bento_version(version), tag
    assert by_name[env.CACHE_DIR.name]["value"] == config.volumes.cache_path
    assert by_name[env.MOUNT_POINT.name]["value"] == config.volumes.mount_path
    status = json.loads(patched["metadata"]["annotations"].get(config.annotations.status, "{}"))
    assert "secretKeyRef" not in json.dumps(status)


def check_result(
    pod: Any,
    namespace: str,
    config: InjectorConfig,
    *,
    naming: str | None = None,
    idempotent: bool = True,
) -> str:
    """Review pod as a CREATE in namespace; check the answer. naming: the key a denial must name."""
    original = copy.deepcopy(pod)
    request = pod_review_request(pod, namespace, uid="fuzz")
    result = review(request, config)
    assert pod == original, "review() changed its input"
    encoded = json.loads(to_json(result.response))
    response = encoded["response"]
    assert response["uid"] == "fuzz"
    if result.outcome == "denied":
        message = response["status"]["message"]
        assert message.startswith(PREFIX), message
        assert response["allowed"] is False
        if naming is not None:
            assert naming in message, f"denial does not name {naming}: {message}"
            assert "expected" in message, f"denial does not say what is accepted: {message}"
        return "denied"
    assert response["allowed"] is True
    if result.outcome == "skipped":
        assert not result.ops
        return "skipped"
    patched = jsonpatch.apply_patch(pod, result.ops)
    if result.outcome == "injected":
        check_no_escape(pod, patched, config)
        if idempotent:
            again = review(pod_review_request(patched, namespace, uid="again"), config)
            assert again.outcome == "unchanged", (again.outcome, again.reason, again.ops)
    return result.outcome


# -- target: AdmissionReview-shaped JSON --------------------------------------------------------


def review_body(request: Any, api_version: Any = "admission.k8s.io/v1", kind: Any = None) -> bytes:
    envelope = {
        "apiVersion": api_version,
        "kind": "AdmissionReview" if kind is None else kind,
        "request": request,
    }
    return json.dumps(envelope).encode()


def check_body(
    body: bytes, config: InjectorConfig = DEFAULT, cache: ReviewCache | None = None
) -> str:
    """The server's path without HTTP: parse, the replica cache, review, encode."""
    try:
        admission = parse_review(body)
    except BadReview as err:
        reason = str(err)
        assert reason, "a 400 must say why"
        return "bad_request"
    request = admission.request
    cache = cache or ReviewCache(size=4)
    key, answer = cache.get(body, request)
    if answer is None:
        result = review(request, config)
        answer = cache.answer(result)
        cache.put(key, answer)
    response = json.loads(answer.body(request.uid))["response"]
    assert response["uid"] == request.uid
    if not response["allowed"] and "status" in response:
        assert response["status"]["message"].startswith(PREFIX), response
    if "patch" in response:
        ops = json.loads(base64.b64decode(response["patch"]))
        assert isinstance(request.object, dict)
        jsonpatch.apply_patch(request.object, ops)
    return answer.outcome


gvk = st.fixed_dictionaries(
    {"group": st.sampled_from(["", "apps"]), "version": st.just("v1")},
    optional={"kind": st.sampled_from(["Pod", "Deployment", "pod"])},
)
requests_ = st.fixed_dictionaries(
    {},
    optional={
        "uid": st.one_of(st.uuids().map(str), values),
        "kind": st.one_of(gvk, json_values),
        "resource": st.one_of(
            st.just({"group": "", "version": "v1", "resource": "pods"}), json_values
        ),
        "subResource": st.one_of(
            st.sampled_from(["", "status", "ephemeralcontainers"]), json_values
        ),
        "operation": st.one_of(
            st.sampled_from(["CREATE", "UPDATE", "DELETE", "CONNECT"]), json_values
        ),
        "namespace": st.one_of(
            st.sampled_from(["serving", "team-b", "kube-system", ""]), json_values
        ),
        "name": json_values,
        "object": json_values,
        "dryRun": st.one_of(st.booleans(), json_values),
        "userInfo": st.one_of(st.just({"username": "alice", "groups": ["dev"]}), json_values),
    },
)

valid_requests = st.fixed_dictionaries(
    {
        "uid": st.text("abcdef0123456789-", min_size=1, max_size=12),
        "kind": st.just({"group": "", "version": "v1", "kind": "Pod"}),
        "operation": st.just("CREATE"),
        "namespace": st.sampled_from(["serving", "team-b", "kube-system"]),
    },
    optional={
        "resource": st.just({"group": "", "version": "v1", "resource": "pods"}),
        "name": st.sampled_from(["llama", ""]),
        "dryRun": st.booleans(),
        "userInfo": st.just(
            {"username": "system:serviceaccount:kube-system:replicaset-controller"}
        ),
    },
)


@st.composite
def envelopes(draw: st.DrawFn) -> bytes:
    """AdmissionReview-shaped JSON: mostly well-formed reviews of odd pods, some broken bytes."""
    if draw(st.sampled_from([True, True, True, False])):
        # A well-formed request of an odd pod, now and then one field anything.
        request = draw(valid_requests)
        request["object"] = draw(st.one_of(pods_with_odd_metadata(), reshaped_pods()))
        if draw(st.sampled_from([False, False, False, False, True])):
            request[draw(st.sampled_from(sorted(request)))] = draw(json_values)
    else:
        request = draw(requests_)
    body = review_body(
        request,
        draw(st.sampled_from(["admission.k8s.io/v1"] * 8 + ["admission.k8s.io/v1beta1", 1])),
        draw(st.sampled_from([None] * 8 + ["AdmissionReview", "Pod"])),
    )
    mangle = draw(st.sampled_from(["none"] * 17 + ["truncate", "byte", "escapes"]))
    if mangle == "truncate":
        body = body[: draw(st.integers(0, len(body)))]
    elif mangle == "byte":
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1 :]
    elif mangle == "escapes":  # escapes JSON allows and Python strings do not hold well
        body = body.replace(b'"serving"', b'"\\ud800"').replace(b'"llama"', b'"\\u0000"')
    return body


# -- target: pods with arbitrary labels and annotations -----------------------------------------

keys = st.one_of(
    st.sampled_from(ANNOTATION_KEYS + LABEL_KEYS + [ANN.status, LABELS.model_store]),
    st.text(max_size=30),
    texts.map(lambda t: "juicefs.bentoml.com/" + t),
)


@st.composite
def pods_with_odd_metadata(draw: st.DrawFn) -> dict[str, Any]:
    """A Bento pod whose labels and annotations are anything, now and then not even strings."""
    pod = bento_pod()
    metadata = pod["metadata"]
    metadata["labels"].update(draw(st.dictionaries(keys, values, max_size=6)))
    metadata["annotations"] = draw(st.dictionaries(keys, values, max_size=8))
    odd = draw(st.integers(0, 19))
    if odd == 0:
        metadata[draw(st.sampled_from(["labels", "annotations"]))] = draw(json_values)
    elif odd == 1:
        target = draw(st.sampled_from(["labels", "annotations"]))
        metadata.setdefault(target, {})[draw(keys)] = draw(json_values)
    elif odd == 2:
        pod["metadata"] = draw(json_values)
    return pod


def check_pod(args: tuple[dict[str, Any], str, str]) -> str:
    pod, namespace, config_name = args
    return check_result(pod, namespace, CONFIGS[config_name])


@st.composite
def one_bad_key(draw: st.DrawFn) -> tuple[dict[str, Any], str, str, str]:
    """A valid Bento pod with exactly one of our labels or annotations set to anything."""
    pod = bento_pod()
    key = draw(st.sampled_from(ANNOTATION_KEYS + LABEL_KEYS))
    value = draw(values)
    where = "labels" if key in LABEL_KEYS else "annotations"
    pod["metadata"].setdefault(where, {})[key] = value
    config = draw(st.sampled_from(sorted(CONFIGS)))
    return pod, key, value, config


def check_one_key(args: tuple[dict[str, Any], str, str, str]) -> str:
    pod, key, value, config_name = args
    config = CONFIGS[config_name]
    namespace = "serving"
    outcome = check_result(pod, namespace, config, naming=key)
    if key == LABELS.inject:
        expected = {"false": "skipped", "true": "injected"}.get(value, "denied")
        assert outcome == expected, (value, outcome)
    return outcome


# -- target: pods of every shape ----------------------------------------------------------------


def _seed_pods() -> list[dict[str, Any]]:
    import yaml

    pods: list[dict[str, Any]] = []
    for case in GOLDEN_CASES:
        for document in yaml.safe_load_all(case.read_text()):
            if isinstance(document, dict):
                pods.extend(copy.deepcopy(p) for p in pods_of(document))
    return [p for p in pods if isinstance(p.get("spec"), dict)]


SEED_PODS = _seed_pods()


def _paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*path, index))


@st.composite
def reshaped_pods(draw: st.DrawFn) -> dict[str, Any]:
    """A realistic pod with one part replaced by any JSON, removed, or nulled."""
    pod: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(SEED_PODS)))
    pod.setdefault("metadata", {}).setdefault("labels", {})[LABELS.model_store] = "juicefs"
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(pod) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = pod
        for token in path[:-1]:
            parent = parent[token]
        how = draw(st.integers(0, 3))
        if how == 0 and isinstance(parent, dict):
            del parent[path[-1]]
        elif how == 1:
            parent[path[-1]] = None
        else:
            parent[path[-1]] = draw(json_values)
    return pod


def check_reshaped(args: tuple[dict[str, Any], str]) -> str:
    pod, config_name = args
    # Idempotence is a promise for pods the apiserver would store; a reshaped
    # one may be refused there, so only no crash, a clean patch, no escape.
    return check_result(pod, "serving", CONFIGS[config_name], idempotent=False)


# -- target: every annotation parser on its own -------------------------------------------------

# A Kubernetes quantity (apimachinery's own grammar); ours accepts a subset.
K8S_QUANTITY = re.compile(
    r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?"
)
PARSERS = [
    "quantity",
    "duration",
    "models",
    "bool",
    "ssd_policy",
    "cache_mode",
    "bento_name",
    "bento_version",
]


def check_parser(args: tuple[str, str]) -> str:
    parser, text = args
    try:
        if parser == "quantity":
            amount = parse_quantity(text)
            assert K8S_QUANTITY.fullmatch(text), f"accepted a non-Kubernetes quantity {text!r}"
            assert isinstance(amount, Decimal)
            assert amount.is_finite()
        elif parser == "duration":
            seconds = parse_duration_seconds(text)
            assert isinstance(seconds, int)
            assert seconds >= 0
        elif parser == "models":
            for tag in env.parse_model_tags(text):
                assert "/" not in tag, tag
                assert tag == tag.strip(), tag
                assert tag.isascii(), tag
        elif parser == "bool":
            assert env.parse_bool(text) in (True, False)
        elif parser == "ssd_policy":
            assert env.parse_ssd_policy(text) in env.SSD_POLICIES
        elif parser == "cache_mode":
            assert env.parse_cache_mode(text) in env.CACHE_MODES
        elif parser in ("bento_name", "bento_version"):
            check = env.is_bento_name if parser == "bento_name" else env.is_bento_version
            if not check(text):
                return "refused"
            assert "/" not in text, text
            assert text not in (".", ".."), text
            assert text.isascii(), text
            assert text == text.strip(), text
            assert len(text) <= 128, text
        return "accepted"
    except (QuantityError, DurationError, ValueError):
        return "refused"


parser_inputs = st.tuples(st.sampled_from(PARSERS), values)


# -- running targets under hypothesis -----------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    strategy: Any
    check: Callable[[Any], str]


TARGETS = [
    Target("review_envelope", envelopes(), check_body),
    Target(
        "pod_labels_annotations",
        st.tuples(
            pods_with_odd_metadata(),
            st.sampled_from(["serving", "team-b", "kube-system"]),
            st.sampled_from(sorted(CONFIGS)),
        ),
        check_pod,
    ),
    Target("one_label_or_annotation", one_bad_key(), check_one_key),
    Target(
        "pod_shapes", st.tuples(reshaped_pods(), st.sampled_from(sorted(CONFIGS))), check_reshaped
    ),
    Target("annotation_parsers", parser_inputs, check_parser),
]


def run_target(target: Target, examples: int, seen: Seen = SEEN) -> None:
    """Run target on `examples` generated inputs (more while shrinking a failure)."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
    )
    @given(target.strategy)
    def run(value: Any) -> None:
        seen.add(target.name, target.check(value))

    run()


# -- HTTP: the real server on loopback ----------------------------------------------------------


class RealServer:
    """`injector.server.serve` (standalone, TLS) on a loopback port, in a thread of its own."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.config = parse_config(
            {
                "server": {
                    "host": "127.0.0.1",
                    "port": self.port,
                    "certDir": str(work / "certs"),
                    "shutdownDelaySeconds": 0,
                    "maxBodyBytes": 256 * 1024,
                }
            }
        )
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.context: ssl.SSLContext | None = None

    def _run(self) -> None:
        from injector.server import serve

        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(serve(self.config, standalone=True, stop=self._stop))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)

    def __enter__(self) -> RealServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not port_answers(self.port):
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the injector did not start")
            time.sleep(0.05)
        ca = Path(self.config.server.cert_dir) / self.config.server.ca_file
        self.context = ssl.create_default_context(cafile=str(ca))
        self.context.check_hostname = False
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        self._loop.close()

    def client(self) -> HttpClient:
        assert self.context is not None
        return HttpClient(self.port, self.context)


class HttpClient:
    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.port, self.context = port, context
        self._conn: http.client.HTTPSConnection | None = None

    def post(self, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(
                    "127.0.0.1", self.port, context=self.context, timeout=30
                )
            try:
                self._conn.request(
                    "POST", "/mutate", body=body, headers={"Content-Type": content_type}
                )
                response = self._conn.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, ConnectionError):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


@st.composite
def http_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["review"] * 7 + ["bytes", "too large", "json"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=512))
    elif kind == "too large":
        body = b"x" * draw(st.sampled_from([256 * 1024 + 1, 300 * 1024]))
    elif kind == "json":
        body = json.dumps(draw(json_values)).encode()
    else:
        body = draw(envelopes())
    content_type = draw(
        st.sampled_from(
            ["application/json"] * 8 + ["", "text/plain", "application/json; charset=utf-8"]
        )
    )
    return body, content_type


def check_http(client: HttpClient, body: bytes, content_type: str, limit: int) -> str:
    status, payload = client.post(body, content_type)
    assert status < 500, (status, payload[:200])
    if len(body) > limit:
        assert status == 413, status
        return "413"
    if status != 200:
        assert status in (400, 415), (status, payload[:200])
        assert payload.strip(), "an error must say why"
        return str(status)
    response = json.loads(payload)["response"]
    message = (response.get("status") or {}).get("message", "")
    assert INTERNAL_ERROR not in message, message
    return "200-allowed" if response["allowed"] else "200-denied"


def run_http(examples: int, work: Path, seen: Seen = SEEN) -> None:
    with RealServer(work) as server:
        client = server.client()
        limit = server.config.server.max_body_bytes

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.generate, Phase.shrink],
        )
        @given(http_bodies())
        def run(args: tuple[bytes, str]) -> None:
            seen.add("http_mutate", check_http(client, *args, limit))

        try:
            run()
        finally:
            client.close()


# -- atheris: coverage-guided, on the bytes of a review -----------------------------------------


def atheris_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for index, pod in enumerate(SEED_PODS[:40]):
        request = pod_review_request(pod, "serving", uid=f"seed-{index}").model_dump(
            by_alias=True, mode="json"
        )
        (directory / f"seed-{index}").write_bytes(review_body(request))


def run_atheris(runs: int, work: Path) -> dict[str, Any]:
    if importlib.util.find_spec("atheris") is None:
        return {"skipped": "atheris is not installed (pip install atheris)"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_atheris", str(runs), str(work / "corpus")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.monotonic() - started
    tail = result.stderr.strip().splitlines()[-12:]
    executed = [
        int(m.group(1))
        for m in re.finditer(r"stat::number_of_executed_units:\s*(\d+)", result.stderr)
    ]
    coverage = re.findall(r"cov: (\d+)", result.stderr)
    if result.returncode != 0:
        raise AssertionError("atheris found a crash:\n" + "\n".join(tail))
    return {
        "runs": executed[-1] if executed else runs,
        "coverage_edges": int(coverage[-1]) if coverage else None,
        "seconds": round(seconds, 1),
    }


# -- the script ---------------------------------------------------------------------------------


def quiet_logs() -> None:
    """Only critical log lines: the server logs every review it answers."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
        cache_logger_on_first_use=False,
    )


@contextlib.contextmanager
def logs_quieted() -> Iterator[None]:
    saved = structlog.get_config()
    quiet_logs()
    try:
        yield
    finally:
        structlog.configure(**saved)


def _worker(names: list[str], examples: int, out: Path) -> None:
    quiet_logs()
    seen = Seen()
    timings = {}
    for target in TARGETS:
        if target.name in names:
            started = time.monotonic()
            run_target(target, examples, seen)
            timings[target.name] = round(time.monotonic() - started, 1)
    out.write_text(json.dumps({"counts": seen.counts, "seconds": timings}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzzing", description="Fuzz the admission path; see tests/fuzzing.py"
    )
    parser.add_argument("--examples", type=int, default=20_000, help="inputs per target")
    parser.add_argument("--http-examples", type=int, default=10_000)
    parser.add_argument("--atheris-runs", type=int, default=50_000, help="0: no atheris")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "fuzz.json")
    parser.add_argument("--target-worker", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.target_worker is not None:
        _worker(args.target_worker, args.examples, args.work / "result.json")
        return 0

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bento-fuzz-"))
    try:
        # The hypothesis targets in worker processes, one per core; HTTP and
        # atheris after them, so the numbers are not a contest for the CPU.
        jobs = max(1, min(args.jobs, len(TARGETS)))
        groups = [[t.name for t in TARGETS[i::jobs]] for i in range(jobs)]
        procs = []
        for index, group in enumerate(groups):
            wdir = work / f"worker-{index}"
            wdir.mkdir()
            cmd = [sys.executable, "-m", "tests.fuzzing", "--examples", str(args.examples)]
            cmd += ["--work", str(wdir), "--target-worker", *group]
            procs.append((wdir, subprocess.Popen(cmd, cwd=REPO)))
        failed = False
        counts: dict[str, dict[str, int]] = {}
        seconds: dict[str, float] = {}
        for wdir, proc in procs:
            if proc.wait() != 0:
                failed = True
                continue
            data = json.loads((wdir / "result.json").read_text())
            counts.update(data["counts"])
            seconds.update(data["seconds"])
        if failed:
            print("fuzz: a target failed (its falsifying example is above)", file=sys.stderr)
            return 1
        http_started = time.monotonic()
        http_seen = Seen()
        with logs_quieted():
            run_http(args.http_examples, work, http_seen)
        counts.update(http_seen.counts)
        seconds["http_mutate"] = round(time.monotonic() - http_started, 1)
        atheris = (
            run_atheris(args.atheris_runs, work)
            if args.atheris_runs
            else {"skipped": "--atheris-runs 0"}
        )
        total = sum(sum(c.values()) for c in counts.values())
        targets = {
            name: {"inputs": sum(c.values()), "seconds": seconds.get(name), "outcomes": dict(c)}
            for name, c in counts.items()
        }
        all_inputs = total + int(atheris.get("runs", 0))
        elapsed = round(time.monotonic() - started, 1)
        report = {
            "inputs": total,
            "atheris": atheris,
            "all_inputs": all_inputs,
            "seconds": elapsed,
            "targets": targets,
            "failures": 0,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        width = max(len(n) for n in counts)
        for name, c in counts.items():
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
            print(f"{name:<{width}}  {sum(c.values()):>7}  {seconds.get(name):>6}s  {outcomes}")
        if "runs" in atheris:
            print(
                f"{'atheris (bytes)':<{width}}  {atheris['runs']:>7}  {atheris['seconds']:>6}s  "
                f"coverage edges {atheris['coverage_edges']}"
            )
        else:
            print(f"atheris: {atheris['skipped']}")
        print(f"fuzz: {all_inputs} inputs, 0 failures, {elapsed} s -> {args.out}")
        return 0
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
