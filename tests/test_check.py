"""`python -m injector check`: every check's verdicts, from API objects as the API serves them."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from common.warm import WARM_ANNOTATION, BentoRef, NodeWarmth, WarmRecord, WarmState
from injector.check.agent import check_node_agent
from injector.check.certificates import verify_served
from injector.check.credentials import check_credentials
from injector.check.endpoints import check_endpoints
from injector.check.fetch import ApiReader, fetch, fetch_endpoints, probe_tls
from injector.check.namespaces import check_namespaces
from injector.check.nodes import check_ssd_nodes, check_streaming_nodes
from injector.check.rows import Row, exit_code
from injector.check.run import run_checks
from injector.check.state import ClusterState, Endpoints, Probe, Unreadable
from injector.check.table import format_table
from injector.check.version import check_version
from injector.check.webhook import check_ca_bundle
from injector.cli import main
from injector.config import InjectorConfig, parse_config
from injector.pki.authority import generate_ca, issue_serving_cert, service_hosts

CONFIG = InjectorConfig()  # the GKE profile: ssdPolicy required, cache mode node
SSD = "cloud.google.com/gke-ephemeral-storage-local-ssd"
STREAMING = "cloud.google.com/gke-image-streaming"
OPT_IN = {"juicefs.bentoml.com/injection": "enabled"}
ENFORCE = "pod-security.kubernetes.io/enforce"
HOME = "bento-juicefs-system"
CREDENTIALS = "juicefs-models-credentials"
SERVICE_NAME = "bento-juicefs-injector.bento-juicefs-system.svc"


def now() -> dt.datetime:
    """The time of each check: certificates made during a long run start minutes later."""
    return dt.datetime.now(dt.UTC)


def config(**sections: Any) -> InjectorConfig:
    return parse_config(sections)


def verdicts(rows: list[Row]) -> list[str]:
    return [row.verdict for row in rows]


def one(rows: list[Row]) -> Row:
    assert len(rows) == 1, rows
    return rows[0]


# -- API objects ---------------------------------------------------------------------


def node(
    name: str,
    labels: dict[str, str] | None = None,
    *,
    ready: bool = True,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def namespace(name: str, labels: dict[str, str] | None = None, **status: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}}, "status": status}


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def secret(name: str, ns: str, *, managed: str = "", **data: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/managed-by": "bento-juicefs-injector"} if managed else {}
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "data": {key.replace("_", "-"): b64(value) for key, value in data.items()},
    }


def webhook_configuration(*bundles: bytes, url: str | None = None) -> dict[str, Any]:
    names = ["inject.juicefs.bentoml.com", "other.juicefs.bentoml.com"]
    hooks = []
    for name, bundle in zip(names, bundles, strict=False):
        client: dict[str, Any] = (
            {"url": url}
            if url
            else {"service": {"name": "bento-juicefs-injector", "namespace": HOME, "port": 443}}
        )
        client["caBundle"] = b64(bundle)
        hooks.append({"name": name, "clientConfig": client})
    return {"metadata": {"name": "bento-juicefs-injector"}, "webhooks": hooks}


def ca_secret(ca_pem: bytes, ca_key: bytes) -> dict[str, Any]:
    return {
        "metadata": {"name": "bento-juicefs-injector-ca", "namespace": HOME},
        "data": {"ca.crt": b64(ca_pem), "ca.key": b64(ca_key)},
    }


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return generate_ca()


@pytest.fixture(scope="module")
def other_ca() -> tuple[bytes, bytes]:
    return generate_ca()


@pytest.fixture(scope="module")
def leaf(ca: tuple[bytes, bytes]) -> bytes:
    hosts = service_hosts("bento-juicefs-injector", HOME, ["localhost", "127.0.0.1"])
    return issue_serving_cert(*ca, hosts)[0]


# -- server version ------------------------------------------------------------------


def version(git: str, major: str = "1", minor: str | None = None) -> dict[str, str]:
    return {"gitVersion": git, "major": major, "minor": minor or git.split(".")[1]}


def test_a_server_with_native_sidecars_and_a_config_that_uses_them_is_ok() -> None:
    row = one(check_version(version("v1.37.2"), CONFIG))
    assert row.verdict == "ok"
    assert "v1.37.2: native sidecars" in row.found
    assert "cluster.kubernetesVersion 1.30" in row.found


def test_gke_style_minor_versions_parse() -> None:
    row = one(check_version(version("v1.30.5-gke.1014001", minor="30+"), CONFIG))
    assert row.verdict == "ok"


def test_a_config_below_the_server_adds_a_classic_sidecar_it_need_not() -> None:
    row = one(check_version(version("v1.31.0"), config(cluster={"kubernetesVersion": "1.28"})))
    assert row.verdict == "warn"
    assert "classic" in row.found
    assert row.fix == 'set cluster.kubernetesVersion: "1.31" in the injector config'


def test_a_native_sidecar_on_a_server_without_them_is_a_fail() -> None:
    row = one(check_version(version("v1.28.9"), CONFIG))
    assert row.verdict == "FAIL"
    assert "has no native sidecars (1.29+)" in row.found
    assert 'cluster.kubernetesVersion: "1.28"' in row.fix


def test_an_old_server_with_a_classic_config_is_a_warning() -> None:
    row = one(check_version(version("v1.27.3"), config(cluster={"kubernetesVersion": "1.27"})))
    assert row.verdict == "warn"
    assert "upgrade to 1.29+" in row.fix


def test_an_unreadable_server_version_is_not_judged() -> None:
    row = one(check_version({"gitVersion": "weird", "major": "", "minor": ""}, CONFIG))
    assert row.verdict == "warn"
    assert "not checked" in row.found


# -- SSD and image-streaming nodes ------------------------------------------------------


def test_ssd_nodes_are_counted_and_named() -> None:
    nodes = [node("a", {SSD: "true"}), node("b", {SSD: "true"}), node("c")]
    row = one(check_ssd_nodes(nodes, CONFIG))
    assert row.verdict == "ok"
    assert row.subject == f"{SSD}=true"
    assert row.found == "ssdPolicy required: 2 of 3 nodes: a, b"


def test_no_ssd_node_is_a_fail_when_pods_require_one() -> None:
    nodes = [node("c"), node("d", {SSD: "false"})]
    row = one(check_ssd_nodes(nodes, CONFIG))
    assert row.verdict == "FAIL"
    assert "no node of 2 has it" in row.found
    assert "stay Pending" in row.found
    assert f"kubectl label node NAME {SSD}=true" in row.fix
    assert "scheduling.ssdPolicy: preferred" in row.fix


def test_ssd_nodes_that_are_not_ready_or_cordoned_do_not_count() -> None:
    cordoned = node("b", {SSD: "true"})
    cordoned["spec"]["unschedulable"] = True
    row = one(check_ssd_nodes([node("a", {SSD: "true"}, ready=False), cordoned], CONFIG))
    assert row.verdict == "FAIL"
    assert "2 nodes (a, b), none Ready and schedulable" in row.found
    # Some ready: ok, and it says how many.
    rows = check_ssd_nodes(
        [node("a", {SSD: "true"}, ready=False), node("c", {SSD: "true"})], CONFIG
    )
    assert one(rows).verdict == "ok"
    assert "(1 Ready and schedulable)" in rows[0].found


def test_no_ssd_node_is_a_warning_when_pods_only_prefer_one() -> None:
    row = one(check_ssd_nodes([node("c")], config(scheduling={"ssdPolicy": "preferred"})))
    assert row.verdict == "warn"
    assert "SlowCacheDisk" in row.found


def test_ssd_policy_off_needs_no_ssd_node() -> None:
    row = one(check_ssd_nodes([node("c")], config(scheduling={"ssdPolicy": "off"})))
    assert row.verdict == "ok"
    assert "ssdPolicy off" in row.found


def test_a_label_without_a_value_only_has_to_exist() -> None:
    eks = config(cluster={"platformProfile": "eks"})
    key = "karpenter.k8s.aws/instance-local-nvme"
    row = one(check_ssd_nodes([node("a", {key: "900"}), node("b")], eks))
    assert row.verdict == "ok"
    assert row.found.endswith("1 of 2 nodes: a")


def test_more_than_five_nodes_are_summarised() -> None:
    nodes = [node(f"n{i}", {SSD: "true"}) for i in range(8)]
    assert one(check_ssd_nodes(nodes, CONFIG)).found.endswith("n0, n1, n2, n3, n4 and 3 more")


def test_streaming_nodes_of_the_profile() -> None:
    row = one(check_streaming_nodes([node("a", {STREAMING: "true"})], CONFIG))
    assert row.verdict == "ok"
    assert row.found.startswith("profile gke (GKE Image streaming), preferred: 1 of 1 node: a")
    row = one(check_streaming_nodes([node("a")], CONFIG))
    assert row.verdict == "warn"
    assert "pulled in full" in row.found
    assert "cluster.profiles.gke.streamingAffinity: off" in row.fix


def test_no_streaming_node_is_a_fail_when_the_profile_requires_one() -> None:
    profiles = {
        "mine": {
            "streamingNodeLabel": {"key": "example.com/stream", "value": None},
            "streamingAffinity": "required",
        }
    }
    required = config(
        cluster={"platformProfile": "mine", "profiles": profiles}, scheduling={"ssdPolicy": "off"}
    )
    row = one(check_streaming_nodes([node("a")], required))
    assert row.verdict == "FAIL"
    assert "stay Pending" in row.found
    assert "cluster.profiles.mine.streamingAffinity: preferred" in row.fix
    assert "kubectl label node NAME example.com/stream=ANY-VALUE" in row.fix


def test_a_profile_without_streaming_affinity_needs_no_label() -> None:
    row = one(check_streaming_nodes([node("a")], config(cluster={"platformProfile": "eks"})))
    assert row.verdict == "ok"
    assert "no image-streaming node label" in row.found


def test_nodes_that_cannot_be_read_are_not_judged() -> None:
    row = one(check_ssd_nodes(Unreadable("403 Forbidden"), CONFIG))
    assert row.verdict == "warn"
    assert row.found == "cannot read nodes: 403 Forbidden; not checked"


# -- the caBundle and the serving certificate ----------------------------------------------


def test_a_caBundle_that_holds_the_secrets_ca_is_ok(ca: tuple[bytes, bytes]) -> None:
    row = one(check_ca_bundle(webhook_configuration(ca[0]), ca_secret(*ca), CONFIG, now()))
    assert row.verdict == "ok"
    assert "trusts the CA in Secret bento-juicefs-system/bento-juicefs-injector-ca" in row.found
    assert "CN=bento-juicefs-injector-ca" in row.found


def test_older_cas_in_the_bundle_are_fine(
    ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes]
) -> None:
    bundle = other_ca[0] + ca[0]
    row = one(check_ca_bundle(webhook_configuration(bundle, bundle), ca_secret(*ca), CONFIG, now()))
    assert row.verdict == "ok"
    assert "(and 1 older CA still trusted)" in row.found


def test_a_caBundle_without_the_secrets_ca_is_a_fail(
    ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes]
) -> None:
    hooks = webhook_configuration(ca[0], other_ca[0])
    row = one(check_ca_bundle(hooks, ca_secret(*ca), CONFIG, now()))
    assert row.verdict == "FAIL"
    assert "the caBundle of webhook other.juicefs.bentoml.com does not hold the CA" in row.found
    assert "failurePolicy Ignore" in row.found
    assert "is it running?" in row.fix


def test_what_a_broken_bundle_means_follows_the_failure_policy(
    ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes]
) -> None:
    hooks = webhook_configuration(other_ca[0])
    assert (
        "failurePolicy Ignore" in one(check_ca_bundle(hooks, ca_secret(*ca), CONFIG, now())).found
    )
    hooks["webhooks"][0]["failurePolicy"] = "Fail"
    row = one(check_ca_bundle(hooks, ca_secret(*ca), CONFIG, now()))
    assert row.found.endswith("every Bento pod is refused (failurePolicy Fail)")


@pytest.mark.parametrize(
    ("bundle", "problem"),
    [
        (b"", "the caBundle is empty"),
        (b"not a certificate", "the caBundle holds no PEM certificate"),
    ],
)
def test_an_empty_or_corrupt_caBundle_is_a_fail(
    ca: tuple[bytes, bytes], bundle: bytes, problem: str
) -> None:
    row = one(check_ca_bundle(webhook_configuration(bundle), ca_secret(*ca), CONFIG, now()))
    assert row.verdict == "FAIL"
    assert f"webhook inject.juicefs.bentoml.com: {problem}" in row.found


def test_a_caBundle_that_is_not_base64_is_a_fail(ca: tuple[bytes, bytes]) -> None:
    hooks = webhook_configuration(ca[0])
    hooks["webhooks"][0]["clientConfig"]["caBundle"] = "%%%"
    assert "is not base64" in one(check_ca_bundle(hooks, ca_secret(*ca), CONFIG, now())).found


def test_expired_certificates_are_a_fail(ca: tuple[bytes, bytes]) -> None:
    later = now() + dt.timedelta(days=3651 + 1)
    row = one(check_ca_bundle(webhook_configuration(ca[0]), ca_secret(*ca), CONFIG, later))
    assert row.verdict == "FAIL"
    assert "every certificate in the caBundle has expired" in row.found


def test_no_webhook_configuration_is_a_fail() -> None:
    row = one(check_ca_bundle(None, None, CONFIG, now()))
    assert row.verdict == "FAIL"
    assert "not installed" in row.found
    assert "kubectl apply -k manifests/base" in row.fix


def test_a_missing_ca_secret_is_a_fail_when_the_injector_makes_it(ca: tuple[bytes, bytes]) -> None:
    row = one(check_ca_bundle(webhook_configuration(ca[0]), None, CONFIG, now()))
    assert row.verdict == "FAIL"
    assert "is missing (the injector creates it at start)" in row.found


def test_without_the_injectors_ca_secret_the_endpoints_decide(ca: tuple[bytes, bytes]) -> None:
    certmanager = config(server={"selfSigned": False})
    row = one(check_ca_bundle(webhook_configuration(ca[0]), None, certmanager, now()))
    assert row.verdict == "warn"
    assert "judged from the endpoints only" in row.found


def test_a_serving_certificate_in_the_secret_is_verified_for_the_service_name(
    ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes], leaf: bytes
) -> None:
    served = {"metadata": {"name": "x"}, "data": {"tls.crt": b64(leaf), "ca.crt": b64(ca[0])}}
    row = one(check_ca_bundle(webhook_configuration(ca[0]), served, CONFIG, now()))
    assert row.verdict == "ok"
    assert f"for {SERVICE_NAME}" in row.found
    row = one(check_ca_bundle(webhook_configuration(other_ca[0]), served, CONFIG, now()))
    assert row.verdict == "FAIL"
    assert "does not verify the serving certificate" in row.found


def test_a_secret_without_a_ca_is_a_fail(ca: tuple[bytes, bytes]) -> None:
    empty = {"metadata": {"name": "x"}, "data": {}}
    row = one(check_ca_bundle(webhook_configuration(ca[0]), empty, CONFIG, now()))
    assert row.verdict == "FAIL"
    assert "holds no CA certificate (ca.crt)" in row.found


def test_verify_served_checks_issuer_name_and_time(
    ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes], leaf: bytes
) -> None:
    assert verify_served(leaf, ca[0], SERVICE_NAME, now()) is None
    assert verify_served(leaf, ca[0], "127.0.0.1", now()) is None
    assert "subjectAltName" in str(verify_served(leaf, ca[0], "elsewhere.svc", now()))
    assert verify_served(leaf, other_ca[0], SERVICE_NAME, now()) is not None  # same name, other key
    stranger = generate_ca("someone-elses-ca")[0]
    assert verify_served(leaf, stranger, SERVICE_NAME, now()) == (
        "it is issued by CN=bento-juicefs-injector-ca, and the caBundle holds CN=someone-elses-ca"
    )
    assert verify_served(leaf, ca[0], SERVICE_NAME, now() + dt.timedelta(days=400)) is not None
    assert verify_served(b"junk", ca[0], SERVICE_NAME, now()) == (
        "the serving certificate is not a PEM certificate"
    )


# -- the endpoints


def test_a_reached_endpoint_whose_certificate_the_bundle_verifies_is_ok(
    ca: tuple[bytes, bytes], leaf: bytes
) -> None:
    hooks = webhook_configuration(ca[0], url="https://127.0.0.1:9443/mutate")
    probe = Probe("127.0.0.1:9443", "127.0.0.1", leaf_pem=leaf)
    endpoints = Endpoints("url", "https://127.0.0.1:9443/mutate", "127.0.0.1", None, (probe,))
    row = one(check_endpoints(hooks, endpoints, CONFIG, now()))
    assert row.verdict == "ok"
    assert row.subject == "127.0.0.1:9443"
    assert "which the caBundle verifies for 127.0.0.1" in row.found


def test_a_reached_endpoint_with_a_certificate_of_another_ca_is_a_fail(
    other_ca: tuple[bytes, bytes], leaf: bytes
) -> None:
    hooks = webhook_configuration(other_ca[0])
    probe = Probe("10.0.0.5:9443", SERVICE_NAME, leaf_pem=leaf)
    endpoints = Endpoints("service", f"{HOME}/bento-juicefs-injector", SERVICE_NAME, 1, (probe,))
    row = one(check_endpoints(hooks, endpoints, CONFIG, now()))
    assert row.verdict == "FAIL"
    assert "does not verify" in row.found
    assert "signature does not match" in row.found


def test_an_endpoint_out_of_reach_leaves_the_secret_to_judge(ca: tuple[bytes, bytes]) -> None:
    hooks = webhook_configuration(ca[0])
    probe = Probe("10.0.0.5:9443", SERVICE_NAME, error="timed out")
    endpoints = Endpoints("service", f"{HOME}/bento-juicefs-injector", SERVICE_NAME, 2, (probe,))
    row = one(check_endpoints(hooks, endpoints, CONFIG, now()))
    assert row.verdict == "ok"
    assert "2 ready endpoints, not reachable from here (10.0.0.5:9443: timed out)" in row.found
    assert "checked against the Secret only" in row.found
    # A URL nobody answers at is worth a warning.
    url = Endpoints("url", "https://127.0.0.1:1/mutate", "127.0.0.1", None, (probe,))
    assert one(check_endpoints(hooks, url, CONFIG, now())).verdict == "warn"


def test_a_service_without_ready_endpoints_is_a_fail(ca: tuple[bytes, bytes]) -> None:
    endpoints = Endpoints("service", f"{HOME}/bento-juicefs-injector", SERVICE_NAME, 0)
    row = one(check_endpoints(webhook_configuration(ca[0]), endpoints, CONFIG, now()))
    assert row.verdict == "FAIL"
    assert "no injector pod is ready" in row.found


def test_no_endpoint_row_without_a_webhook_configuration() -> None:
    assert check_endpoints(None, Endpoints("none", "", ""), CONFIG, now()) == []


# -- namespaces ----------------------------------------------------------------------------


@pytest.mark.parametrize("level", [None, "privileged", "baseline", "restricted", "Restricted"])
def test_any_pod_security_level_is_fine(level: str | None) -> None:
    labels = OPT_IN if level is None else {**OPT_IN, ENFORCE: level}
    row = one(check_namespaces([namespace("team", labels)], CONFIG))
    assert row.verdict == "ok"
    assert row.found == (
        "1 namespace opted in: team; any Pod Security level works "
        "(the injected juicefs-mount sidecar passes restricted)"
    )
    assert row.fix == ""


def test_the_opted_in_namespaces_are_listed_in_one_line() -> None:
    names = [f"team-{i}" for i in range(7)]
    rows = check_namespaces([*(namespace(n, OPT_IN) for n in names), namespace("c")], CONFIG)
    row = one(rows)
    assert (row.id, row.subject) == ("namespaces-opted-in", "namespaces")
    assert row.found.startswith(
        "7 namespaces opted in: team-0, team-1, team-2, team-3, team-4 and 2 more; "
    )


def test_no_opted_in_namespace_is_a_warning() -> None:
    row = one(check_namespaces([namespace("a"), namespace("b")], CONFIG))
    assert row.verdict == "warn"
    assert "nothing is injected" in row.found
    assert row.fix == "kubectl label namespace NAME juicefs.bentoml.com/injection=enabled"


def test_terminating_namespaces_are_left_out() -> None:
    going = namespace("old", {**OPT_IN, ENFORCE: "restricted"}, phase="Terminating")
    row = one(check_namespaces([going, namespace("a", OPT_IN)], CONFIG))
    assert "opted in: a;" in row.found


def test_an_excluded_namespace_with_the_label_is_a_warning() -> None:
    rows = check_namespaces([namespace("kube-system", OPT_IN), namespace("a", OPT_IN)], CONFIG)
    assert verdicts(rows) == ["warn", "ok"]
    assert rows[0].subject == "namespace kube-system"
    assert "never mutates it" in rows[0].found


# -- credentials ----------------------------------------------------------------------------


def source(**data: str) -> dict[str, Any]:
    return secret(CREDENTIALS, HOME, **data)


def test_the_source_and_its_copies_are_ok() -> None:
    src = source(metaurl="redis://secret-host/1", access_key="AK", secret_key="SK")
    copy = {**secret(CREDENTIALS, "team", managed="yes"), "data": src["data"]}
    rows = check_credentials(
        [namespace("team", OPT_IN)], {CREDENTIALS: src}, {("team", CREDENTIALS): copy}, CONFIG
    )
    assert [(r.subject, r.verdict) for r in rows] == [
        (f"Secret {HOME}/{CREDENTIALS}", "ok"),
        (f"Secret team/{CREDENTIALS}", "ok"),
    ]
    assert rows[0].found == "keys metaurl, access-key, secret-key; values not shown"
    assert "secret-host" not in format_table(rows)


def test_a_volume_bound_to_other_namespaces_wants_no_copy_here() -> None:
    config = InjectorConfig.model_validate(
        {"juicefs": {"allowedVolumes": ["models", "team-b"], "volumeNamespaces": {"team-b": ["b"]}}}
    )
    team_b = "juicefs-team-b-credentials"
    src = source(metaurl="redis://x")
    sources = {CREDENTIALS: src, team_b: {**secret(team_b, HOME), "data": src["data"]}}
    rows = check_credentials([namespace("a", OPT_IN), namespace("b", OPT_IN)], sources, {}, config)
    subjects = [r.subject for r in rows if r.verdict != "ok"]
    assert subjects == [
        f"Secret a/{CREDENTIALS}",
        f"Secret b/{CREDENTIALS}",
        f"Secret b/{team_b}",
    ]


def test_a_source_without_object_store_keys_is_fine() -> None:
    row = one(check_credentials([], {CREDENTIALS: source(metaurl="redis://x")}, {}, CONFIG))
    assert row.verdict == "ok"
    assert "no object-store keys" in row.found


def test_a_missing_source_is_a_fail() -> None:
    row = one(check_credentials([], {CREDENTIALS: None}, {}, CONFIG))
    assert row.verdict == "FAIL"
    assert "CreateContainerConfigError" in row.found
    assert f"kubectl -n {HOME} create secret generic {CREDENTIALS} --from-literal=metaurl=" in (
        row.fix
    )


@pytest.mark.parametrize(
    ("data", "said"), [({}, "no metaurl key"), ({"metaurl": ""}, "(it is empty)")]
)
def test_a_source_without_metaurl_is_a_fail(data: dict[str, str], said: str) -> None:
    row = one(check_credentials([], {CREDENTIALS: source(**data)}, {}, CONFIG))
    assert row.verdict == "FAIL"
    assert said in row.found


def test_a_missing_copy_is_a_fail() -> None:
    rows = check_credentials(
        [namespace("team", OPT_IN)],
        {CREDENTIALS: source(metaurl="redis://x")},
        {("team", CREDENTIALS): None},
        CONFIG,
    )
    assert verdicts(rows) == ["ok", "FAIL"]
    assert "no copy in this opted-in namespace" in rows[1].found
    assert "namespace controller" in rows[1].fix


def test_a_copy_without_metaurl_is_a_fail() -> None:
    copy = secret(CREDENTIALS, "team", managed="yes", access_key="AK")
    rows = check_credentials(
        [namespace("team", OPT_IN)],
        {CREDENTIALS: source(metaurl="redis://x", access_key="AK")},
        {("team", CREDENTIALS): copy},
        CONFIG,
    )
    assert verdicts(rows) == ["ok", "FAIL"]
    assert "the copy has no metaurl key (keys: access-key)" in rows[1].found


def test_a_stale_copy_or_someone_elses_secret_is_a_warning() -> None:
    src = source(metaurl="redis://new")
    stale = secret(CREDENTIALS, "a", managed="yes", metaurl="redis://old")
    theirs = secret(CREDENTIALS, "b", metaurl="redis://new")
    rows = check_credentials(
        [namespace("a", OPT_IN), namespace("b", OPT_IN)],
        {CREDENTIALS: src},
        {("a", CREDENTIALS): stale, ("b", CREDENTIALS): theirs},
        CONFIG,
    )
    assert verdicts(rows) == ["ok", "warn", "warn"]
    assert "differs from the source" in rows[1].found
    assert "not the injector's copy" in rows[2].found


def test_a_secret_only_an_annotation_can_choose_is_a_warning() -> None:
    two = config(juicefs={"allowedVolumes": ["models", "extra"]})
    rows = check_credentials(
        [], {CREDENTIALS: source(metaurl="redis://x"), "juicefs-extra-credentials": None}, {}, two
    )
    assert verdicts(rows) == ["ok", "warn"]
    assert "pods whose annotation picks its volume" in rows[1].found


def test_unreadable_secrets_are_not_judged() -> None:
    rows = check_credentials(
        [namespace("team", OPT_IN)],
        {CREDENTIALS: source(metaurl="redis://x")},
        {("team", CREDENTIALS): Unreadable("403 Forbidden")},
        CONFIG,
    )
    assert verdicts(rows) == ["ok", "warn"]
    assert rows[1].found == "cannot read it: 403 Forbidden; not checked"


# -- the node agent ------------------------------------------------------------------------------

DAEMONSET = {
    "metadata": {"name": "bento-juicefs-node-agent", "namespace": HOME, "uid": "ds-uid"},
    "spec": {"template": {"spec": {"nodeSelector": {SSD: "true"}}}},
}


def agent_pod(
    name: str, node_name: str, *, ready: bool = True, waiting: str = ""
) -> dict[str, Any]:
    state: dict[str, Any] = {"waiting": {"reason": waiting}} if waiting else {"running": {}}
    return {
        "metadata": {"name": name, "ownerReferences": [{"kind": "DaemonSet", "uid": "ds-uid"}]},
        "spec": {"nodeName": node_name},
        "status": {
            "phase": "Pending" if waiting else "Running",
            "containerStatuses": [{"name": "node-agent", "ready": ready, "state": state}],
        },
    }


def record(*entries: tuple[str, WarmState, str]) -> str:
    return NodeWarmth(
        {
            BentoRef("models", name, "v1"): WarmRecord(
                BentoRef("models", name, "v1"),
                state,
                message=message,
            )
            for name, state, message in entries
        }
    ).render()


def test_a_running_agent_and_its_record_are_counted() -> None:
    warm = record(("a", "warm", ""), ("b", "warm", ""), ("c", "warming", ""), ("d", "evicted", ""))
    nodes = [node("ssd-1", {SSD: "true"}, annotations={WARM_ANNOTATION: warm}), node("plain")]
    row = one(check_node_agent(nodes, DAEMONSET, [agent_pod("agent-x", "ssd-1")], CONFIG))
    assert row.verdict == "ok"
    assert row.subject == "node ssd-1"
    assert row.found == "pod agent-x running; Bentos: 2 warm, 1 warming, 0 failed, 1 evicted"


def test_a_node_with_no_record_yet() -> None:
    row = one(
        check_node_agent([node("n", {SSD: "true"})], DAEMONSET, [agent_pod("p", "n")], CONFIG)
    )
    assert row.found == "pod p running; no warm-models record yet"


def test_failed_bentos_are_a_warning_that_names_them() -> None:
    warm = record(("a", "warm", ""), ("b", "failed", "sha256 mismatch"))
    nodes = [node("n", {SSD: "true"}, annotations={WARM_ANNOTATION: warm})]
    row = one(check_node_agent(nodes, DAEMONSET, [agent_pod("p", "n")], CONFIG))
    assert row.verdict == "warn"
    assert row.found.endswith("1 warm, 0 warming, 1 failed; failed: b:v1 (sha256 mismatch)")
    assert "kubectl describe node n" in row.fix


def test_an_ssd_node_without_an_agent_pod_fails() -> None:
    pods = [agent_pod("p", "other"), {**agent_pod("q", "n"), "metadata": {"name": "q"}}]
    row = one(check_node_agent([node("n", {SSD: "true"})], DAEMONSET, pods, CONFIG))
    assert row.verdict == "FAIL"
    assert row.found.startswith(f"no agent pod on this node (the DaemonSet selects {SSD}=true)")


def test_an_agent_pod_that_does_not_run_fails() -> None:
    pods = [agent_pod("p", "n", ready=False, waiting="ImagePullBackOff")]
    row = one(check_node_agent([node("n", {SSD: "true"})], DAEMONSET, pods, CONFIG))
    assert row.verdict == "FAIL"
    assert row.found.startswith("pod p is Pending, node-agent waiting: ImagePullBackOff")
    assert row.fix == f"kubectl -n {HOME} describe pod p"


def test_an_unreadable_record_is_a_warning() -> None:
    nodes = [node("n", {SSD: "true"}, annotations={WARM_ANNOTATION: "{not json"})]
    row = one(check_node_agent(nodes, DAEMONSET, [agent_pod("p", "n")], CONFIG))
    assert row.verdict == "warn"
    assert "annotation is unreadable" in row.found


@pytest.mark.parametrize("cache_mode", ["node", "pod"])
def test_no_daemonset_fails_in_either_cache_mode(cache_mode: str) -> None:
    """The agent mounts for every Bento pod: without it none starts."""
    row = one(
        check_node_agent([node("n", {SSD: "true"})], None, [], config(cache={"mode": cache_mode}))
    )
    assert row.verdict == "FAIL"
    assert row.found == (
        "not installed: the node agent mounts for every Bento pod, so none starts "
        "(each waits for it, its startup probe says so)"
    )
    assert row.fix == "kubectl apply -k manifests/base (docs/node-agent.md)"


# -- the table and the exit code --------------------------------------------------------------


def test_render_aligns_columns_and_puts_what_to_do_below() -> None:
    rows = [
        Row("server-version", "cluster", "ok", "v1.37.2"),
        Row("credentials-copy", "Secret team/x", "FAIL", "missing", "kubectl create ..."),
        Row("node-agent", "node n", "warn", "not installed"),
    ]
    text = format_table(rows, "heading")
    assert text == (
        "heading\n"
        "VERDICT  ID                ON             FOUND\n"
        "ok       server-version    cluster        v1.37.2\n"
        "FAIL     credentials-copy  Secret team/x  missing\n"
        "                                          fix: kubectl create ...\n"
        "warn     node-agent        node n         not installed\n"
        "\n"
        "1 FAIL, 1 warn, 1 ok: something blocks injection (the FAIL lines say what to do)\n"
    )
    assert exit_code(rows) == 1
    assert exit_code(rows[::2]) == 0
    assert format_table(rows[:1]).endswith("0 FAIL, 0 warn, 1 ok: nothing blocks injection\n")


# -- the I/O: fetch through a stand-in ApiClient, a real TLS handshake ------------------------


class FakeApi:
    """call_api by path, as kubernetes_asyncio's ApiClient answers it."""

    def __init__(self, objects: dict[str, Any]) -> None:
        self.objects = objects
        self.paths: list[tuple[str, list[tuple[str, str]]]] = []

    async def call_api(self, path: str, method: str, **kwargs: Any) -> Any:
        from injector.kube import ApiException

        assert method == "GET"
        assert kwargs["response_types_map"] == {200: "object"}
        self.paths.append((path, kwargs["query_params"]))
        found = self.objects.get(path)
        if isinstance(found, int):
            raise ApiException(status=found, reason="Forbidden" if found == 403 else "Not Found")
        if found is None:
            raise ApiException(status=404, reason="Not Found")
        return json.loads(json.dumps(found))


async def test_fetch_reads_what_the_checks_need_and_run_checks_judges_it(
    ca: tuple[bytes, bytes],
) -> None:
    hooks = webhook_configuration(ca[0])
    api = FakeApi(
        {
            "/version": version("v1.37.2"),
            "/api/v1/nodes": {"items": [node("ssd-1", {SSD: "true", STREAMING: "true"})]},
            "/api/v1/namespaces": {
                "items": [
                    namespace("team", OPT_IN),
                    namespace("psa", {**OPT_IN, ENFORCE: "baseline"}),
                ]
            },
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"
            "bento-juicefs-injector": hooks,
            f"/api/v1/namespaces/{HOME}/secrets/bento-juicefs-injector-ca": ca_secret(*ca),
            f"/api/v1/namespaces/{HOME}/services/bento-juicefs-injector": {
                "spec": {"ports": [{"name": "https", "port": 443, "targetPort": "https"}]}
            },
            f"/apis/discovery.k8s.io/v1/namespaces/{HOME}/endpointslices": {"items": []},
            f"/api/v1/namespaces/{HOME}/secrets/{CREDENTIALS}": source(metaurl="redis://x"),
            f"/api/v1/namespaces/team/secrets/{CREDENTIALS}": 403,
            f"/apis/apps/v1/namespaces/{HOME}/daemonsets/bento-juicefs-node-agent": DAEMONSET,
            "/api/v1/namespaces/team/pods": {"items": []},
            "/api/v1/namespaces/psa/pods": 403,
            f"/api/v1/namespaces/{HOME}/pods": {"items": [agent_pod("agent-1", "ssd-1")]},
        }
    )
    state = await fetch(api, CONFIG)
    assert isinstance(state, ClusterState)
    assert state.endpoints == Endpoints(
        "service", f"{HOME}/bento-juicefs-injector", SERVICE_NAME, 0
    )
    assert state.copies[("team", CREDENTIALS)] == Unreadable("403 Forbidden")
    assert state.copies[("psa", CREDENTIALS)] is None
    assert (f"/api/v1/namespaces/{HOME}/pods", []) not in api.paths  # by the DaemonSet's selector
    rows = run_checks(state, CONFIG, now())
    table = {(r.id, r.subject): r.verdict for r in rows}
    assert table == {
        ("server-version", "cluster"): "ok",
        ("ssd-nodes", f"{SSD}=true"): "ok",
        ("streaming-nodes", f"{STREAMING}=true"): "ok",
        ("webhook-cabundle", "MutatingWebhookConfiguration bento-juicefs-injector"): "ok",
        ("webhook-endpoint", f"Service {HOME}/bento-juicefs-injector"): "FAIL",
        ("namespaces-opted-in", "namespaces"): "ok",
        ("credentials-source", f"Secret {HOME}/{CREDENTIALS}"): "ok",
        ("credentials-copy", f"Secret psa/{CREDENTIALS}"): "FAIL",
        ("credentials-copy", f"Secret team/{CREDENTIALS}"): "warn",
        ("node-agent", "node ssd-1"): "ok",
        ("pod-not-injected", "namespace psa"): "warn",
        ("sidecar-image-skew", "Bento pods"): "ok",
        ("readiness-gate-stuck", "Bento pods"): "ok",
    }
    assert (
        "/api/v1/namespaces/team/pods",
        [("labelSelector", "juicefs.bentoml.com/model-store=juicefs")],
    ) in api.paths


@pytest.fixture
async def tls_server(ca: tuple[bytes, bytes], leaf: bytes, tmp_path: Path) -> AsyncIterator[int]:
    hosts = service_hosts("bento-juicefs-injector", HOME, ["localhost", "127.0.0.1"])
    cert, key = issue_serving_cert(*ca, hosts)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_probe_tls_takes_the_presented_certificate(
    tls_server: int, ca: tuple[bytes, bytes]
) -> None:
    probe = await probe_tls("127.0.0.1", tls_server, "127.0.0.1")
    assert probe.error is None
    assert probe.leaf_pem is not None
    assert verify_served(probe.leaf_pem, ca[0], "127.0.0.1", now()) is None
    assert probe.address == f"127.0.0.1:{tls_server}"


async def test_probe_tls_says_why_it_could_not_connect() -> None:
    from common.ports import free_port

    probe = await probe_tls("127.0.0.1", free_port(), "127.0.0.1", seconds=2)
    assert probe.leaf_pem is None
    assert probe.error


def test_the_command_exits_2_when_there_is_no_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from common.ports import free_port

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": f"https://127.0.0.1:{free_port()}"}}
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    assert main(["check", "--kubeconfig", str(kubeconfig)]) == 2
    assert "error: cannot reach https://127.0.0.1:" in capsys.readouterr().err


async def test_a_services_ready_endpoints_are_each_connected_to(
    tls_server: int, ca: tuple[bytes, bytes]
) -> None:
    """The Service's port by name to the EndpointSlice's port, ready addresses only."""
    slices = {
        "items": [
            {
                "ports": [{"name": "metrics", "port": 1}, {"name": "https", "port": tls_server}],
                "endpoints": [
                    {"addresses": ["127.0.0.1"], "conditions": {"ready": True}},
                    {"addresses": ["127.0.0.2"], "conditions": {"ready": False}},
                ],
            }
        ]
    }
    api = FakeApi(
        {
            f"/api/v1/namespaces/{HOME}/services/bento-juicefs-injector": {
                "spec": {"ports": [{"name": "https", "port": 443, "targetPort": "https"}]}
            },
            f"/apis/discovery.k8s.io/v1/namespaces/{HOME}/endpointslices": slices,
        }
    )
    hooks = webhook_configuration(ca[0])
    endpoints = await fetch_endpoints(ApiReader(api), hooks, CONFIG)
    assert (
        f"/apis/discovery.k8s.io/v1/namespaces/{HOME}/endpointslices",
        [("labelSelector", "kubernetes.io/service-name=bento-juicefs-injector")],
    ) in api.paths
    assert endpoints.ready == 1
    assert [p.address for p in endpoints.probes] == [f"127.0.0.1:{tls_server}"]
    row = one(check_endpoints(hooks, endpoints, CONFIG, now()))
    assert row.verdict == "ok"
    assert f"which the caBundle verifies for {SERVICE_NAME}" in row.found
