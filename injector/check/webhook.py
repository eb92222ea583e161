"""`python -m injector check`: what a cluster lacks for injection, one verdict per line.

A preflight against the current kubeconfig, like `istioctl x precheck` or
`linkerd check`. Each check is a pure function of API objects already
fetched (plain dicts, as the API serves them) and the injector's config, and
returns rows: a verdict (`ok`, `warn`, `FAIL`), what it is about, what was
found and what to do. `fetch()` is the only I/O: GETs through the
kubernetes_asyncio ApiClient (no kubectl), and TLS handshakes with the
webhook's endpoints when they are reachable from here. `render()` draws the
table. FAIL means something blocks injection (or the pods it makes); the
command then exits 1.

What is checked, and against what:

- the server's version: native sidecars need 1.29+, and the config's
  `cluster.kubernetesVersion` decides which kind the injector adds;
- the nodes with the SSD label and the image-streaming label of the platform
  profile (none is FAIL when pods require them, a warning when they prefer);
- the webhook's caBundle against the serving certificate: against the CA in
  the injector's shared Secret (the issuer of every replica's serving
  certificate), and against the certificate each reachable endpoint presents,
  verified for the name the apiserver asks for;
- the opted-in namespaces (any Pod Security level works: what the injector
  adds passes `restricted`), and an opt-in label where it has no effect;
- the JuiceFS credentials Secret in the injector's namespace, and its copy in
  each opted-in namespace (names of keys only: values are never printed);
- the node agent on each SSD node: its DaemonSet pod there (it mounts for
  every Bento pod, so a node without it starts none), and the node's
  warm-models record (`common.warm`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from common.warm import WARM_ANNOTATION, WARM_STATES, NodeWarmth
from injector.config import InjectorConfig, NodeLabel
from injector.kube import ApiException, new_api_client
from injector.namespaces import credential_secret_names, opted_in

Verdict = Literal["ok", "warn", "FAIL"]
VERDICTS: tuple[Verdict, ...] = ("ok", "warn", "FAIL")

# Native sidecars (initContainers with restartPolicy: Always) are on by default from 1.29.
NATIVE_SIDECARS = (1, 29)
# The shipped node agent (manifests/base/node-agent.yaml); not a config key.
NODE_AGENT = "bento-juicefs-node-agent"
# Keys of the injector's shared CA Secret (injector.cluster_certs), and of a
# serving-certificate Secret (cert-manager's kind).
CA_CERT_KEY = "ca.crt"
TLS_CERT_KEY = "tls.crt"
# How many names a row lists before "and N more".
SHOWN = 5
# How many of the webhook's endpoints to connect to, and how long to wait for each.
MAX_PROBES = 4
PROBE_TIMEOUT = 3.0


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    check: str
    subject: str
    verdict: Verdict
    found: str
    fix: str = ""


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


Obj = Mapping[str, Any]


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


# -- helpers -------------------------------------------------------------------------


def _dig(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _name(obj: Obj) -> str:
    return str(_dig(obj, "metadata", "name") or "")


def _labels(obj: Obj) -> dict[str, str]:
    return dict(_dig(obj, "metadata", "labels") or {})


def _listed(names: Sequence[str]) -> str:
    if len(names) <= SHOWN:
        return ", ".join(names)
    return f"{', '.join(names[:SHOWN])} and {len(names) - SHOWN} more"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _unreadable(check: str, subject: str, what: str, why: Unreadable) -> Row:
    return Row(
        check,
        subject,
        "warn",
        f"cannot read {what}: {why.reason}; not checked",
        "run the check with a kubeconfig that may read it (e.g. cluster-admin)",
    )


def has_label(node: Obj, label: NodeLabel) -> bool:
    labels = _labels(node)
    if label.key not in labels:
        return False
    return label.value is None or labels[label.key] == label.value


def node_ready(node: Obj) -> bool:
    """Ready=True and not cordoned: the scheduler may place pods there."""
    if _dig(node, "spec", "unschedulable"):
        return False
    conditions = _dig(node, "status", "conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _label_command(label: NodeLabel) -> str:
    if label.value is None:  # the affinity asks only that it exists
        return f"kubectl label node NAME {label.key}=ANY-VALUE"
    return f"kubectl label node NAME {label.key}={label.value}"


def parse_server_version(version: Obj) -> tuple[int, int] | None:
    """(major, minor) from /version; GKE's and EKS's minors look like `30+`."""
    try:
        major = int(str(version.get("major", "")).rstrip("+"))
        minor = int(str(version.get("minor", "")).rstrip("+"))
    except ValueError:
        git = str(version.get("gitVersion", "")).lstrip("v").split(".")
        try:
            major, minor = int(git[0]), int(git[1])
        except (ValueError, IndexError):
            return None
    return major, minor


# -- the checks ----------------------------------------------------------------------


def check_version(version: Obj, config: InjectorConfig) -> list[Row]:
    """The server's version against native sidecars and cluster.kubernetesVersion."""
    check, subject = "server version", "cluster"
    shown = str(version.get("gitVersion") or "unknown")
    parsed = parse_server_version(version)
    configured = config.cluster.kubernetes_version
    if parsed is None:
        return [
            Row(check, subject, "warn", f"cannot read the server's version ({shown}); not checked")
        ]
    server_native = parsed >= NATIVE_SIDECARS
    config_native = config.cluster.native_sidecars
    minor = f"{parsed[0]}.{parsed[1]}"
    if server_native and config_native:
        return [
            Row(
                check,
                subject,
                "ok",
                f"{shown}: native sidecars (1.29+); cluster.kubernetesVersion {configured}: "
                "the sidecar is initContainers[0] with restartPolicy: Always",
            )
        ]
    if server_native:
        return [
            Row(
                check,
                subject,
                "warn",
                f"{shown} runs native sidecars, but cluster.kubernetesVersion {configured} makes "
                "the injector add a classic one (containers[0] with a blocking postStart check; "
                "a Job's pod never completes while it runs)",
                f'set cluster.kubernetesVersion: "{minor}" in the injector config',
            )
        ]
    if config_native:
        return [
            Row(
                check,
                subject,
                "FAIL",
                f"{shown} has no native sidecars (1.29+), but cluster.kubernetesVersion "
                f"{configured} makes the injector add one: an init container with "
                "restartPolicy: Always that this server does not run beside the app",
                f'set cluster.kubernetesVersion: "{minor}" in the injector config '
                "(a classic sidecar), or upgrade the cluster to 1.29+",
            )
        ]
    return [
        Row(
            check,
            subject,
            "warn",
            f"{shown} predates native sidecars (1.29+); cluster.kubernetesVersion {configured}: "
            "the sidecar is classic (containers[0], blocking postStart check)",
            "upgrade to 1.29+ and set cluster.kubernetesVersion to match, for native sidecars",
        )
    ]


def _labelled_nodes(
    check: str,
    nodes: Sequence[Obj],
    label: NodeLabel,
    policy: str,
    knob: str,
    without: str,
    having: str,
) -> Row:
    """Nodes with a label the injector's affinity names: count, and a verdict by policy."""
    matched = [n for n in nodes if has_label(n, label)]
    ready = [n for n in matched if node_ready(n)]
    names = sorted(_name(n) for n in matched)
    subject = str(label)
    if ready:
        note = "" if len(ready) == len(matched) else f" ({len(ready)} Ready and schedulable)"
        return Row(
            check,
            subject,
            "ok",
            f"{len(matched)} of {_plural(len(nodes), 'node')}{note}: {_listed(names)}",
        )
    verdict: Verdict = "FAIL" if policy == "required" else "warn"
    if matched:
        found = f"{_plural(len(matched), 'node')} ({_listed(names)}), none Ready and schedulable"
    else:
        found = f"no node of {len(nodes)} has it"
    if policy == "required":
        found += "; pods require it (node affinity), so they stay Pending"
    else:
        found += f"; pods only prefer it, so they run {without}"
    fix = f"label the nodes {having} ({_label_command(label)}), or set {knob}"
    return Row(check, subject, verdict, found, fix)


def check_ssd_nodes(nodes: Sequence[Obj] | Unreadable, config: InjectorConfig) -> list[Row]:
    check = "SSD nodes"
    policy = config.scheduling.ssd_policy
    label = config.ssd_node_label
    if policy == "off" or label is None:
        return [
            Row(
                check,
                "cluster",
                "ok",
                "scheduling.ssdPolicy off: pods are not steered to local-SSD nodes",
            )
        ]
    if isinstance(nodes, Unreadable):
        return [_unreadable(check, str(label), "nodes", nodes)]
    row = _labelled_nodes(
        check,
        nodes,
        label,
        policy,
        "scheduling.ssdNodeLabel to the label they have"
        + (", or scheduling.ssdPolicy: preferred" if policy == "required" else ""),
        "anywhere, and the cache may land on a network disk (a SlowCacheDisk Event says so)",
        "with local SSDs",
    )
    return [Row(row.check, row.subject, row.verdict, f"ssdPolicy {policy}: {row.found}", row.fix)]


def check_streaming_nodes(nodes: Sequence[Obj] | Unreadable, config: InjectorConfig) -> list[Row]:
    check = "image streaming nodes"
    name = config.cluster.platform_profile
    profile = config.cluster.profile
    label, affinity = profile.streaming_node_label, profile.streaming_affinity
    what = f"profile {name}" + (f" ({profile.description})" if profile.description else "")
    if label is None or affinity == "off":
        return [Row(check, "cluster", "ok", f"{what}: no image-streaming node label to steer to")]
    if isinstance(nodes, Unreadable):
        return [_unreadable(check, str(label), "nodes", nodes)]
    row = _labelled_nodes(
        check,
        nodes,
        label,
        affinity,
        f"cluster.profiles.{name}.streamingAffinity: "
        + ("preferred" if affinity == "required" else "off"),
        "where they land, and their images are pulled in full before they start",
        "that stream images",
    )
    return [Row(row.check, row.subject, row.verdict, f"{what}, {affinity}: {row.found}", row.fix)]


# -- certificates


def _certificates(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def _describe(cert: x509.Certificate) -> str:
    subject = cert.subject.rfc4514_string() or "(no subject)"
    return f"{subject}, expires {cert.not_valid_after_utc:%Y-%m-%d}"


def _valid_at(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now < cert.not_valid_after_utc


def _same_certificate(a: x509.Certificate, b: x509.Certificate) -> bool:
    """The same CA: subject and public key (a re-encoded copy is still the same CA)."""
    return a.subject == b.subject and a.public_key() == b.public_key()


def apiserver_server_name(webhook_configuration: Obj, config: InjectorConfig) -> str:
    """The name the apiserver verifies the webhook's certificate for."""
    client = _ours(webhook_configuration, config).get("clientConfig") or {}
    if client.get("url"):
        return urlsplit(str(client["url"])).hostname or ""
    service = client.get("service") or {}
    name = service.get("name") or config.webhook.service_name
    namespace = service.get("namespace") or config.webhook.namespace
    return f"{name}.{namespace}.svc"


def _ours(webhook_configuration: Obj, config: InjectorConfig) -> Obj:
    hooks = webhook_configuration.get("webhooks") or []
    for hook in hooks:
        if hook.get("name") == config.webhook.name:
            return dict(hook)
    return dict(hooks[0]) if hooks else {}


def verify_served(
    leaf_pem: bytes, bundle_pem: bytes, server_name: str, now: dt.datetime
) -> str | None:
    """None when the caBundle verifies this serving certificate for server_name; else why not.

    The chain is built from the leaf to a certificate of the bundle (the
    bundle's certificates are the roots, as the apiserver uses them).
    """
    leaves = _certificates(leaf_pem)
    if not leaves:
        return "the serving certificate is not a PEM certificate"
    roots = _certificates(bundle_pem)
    if not roots:
        return "the caBundle holds no certificate"
    leaf, *intermediates = leaves
    issuers = {c.subject for c in [*roots, *intermediates]}
    if leaf.issuer not in issuers:
        held = "; ".join(sorted({r.subject.rfc4514_string() for r in roots}))
        return f"it is issued by {leaf.issuer.rfc4514_string()}, and the caBundle holds {held}"
    try:
        subject: x509.verification.Subject = x509.IPAddress(ipaddress.ip_address(server_name))
    except ValueError:
        subject = x509.DNSName(server_name)
    verifier = PolicyBuilder().store(Store(roots)).time(now).build_server_verifier(subject)
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as err:
        return str(err).split(" (encountered processing")[0]
    return None


def _bundles(webhook_configuration: Obj) -> list[tuple[str, bytes | None]]:
    """(webhook name, decoded caBundle or None when it is not base64) per webhook."""
    found: list[tuple[str, bytes | None]] = []
    for hook in webhook_configuration.get("webhooks") or []:
        encoded = _dig(hook, "clientConfig", "caBundle") or ""
        try:
            found.append((str(hook.get("name")), base64.b64decode(encoded, validate=True)))
        except ValueError:
            found.append((str(hook.get("name")), None))
    return found


def _secret_bytes(secret: Obj, key: str) -> bytes | None:
    value = (secret.get("data") or {}).get(key)
    if value is None:
        return None
    try:
        return base64.b64decode(value)
    except ValueError:
        return b""


def _without_injector(webhook_configuration: Obj, config: InjectorConfig) -> str:
    """What happens to a Bento pod when the apiserver cannot call the webhook."""
    if _ours(webhook_configuration, config).get("failurePolicy") == "Fail":
        return "every Bento pod is refused (failurePolicy Fail)"
    return (
        "Bento pods are created without the sidecar (failurePolicy Ignore) and the "
        "sidecar-required policy refuses them"
    )


def _bundle_fix(config: InjectorConfig) -> str:
    namespace = config.webhook.namespace
    if config.server.self_signed and config.webhook.manage_ca_bundle:
        return (
            "the injector patches the caBundle at start and every "
            "webhook.caBundleCheckSeconds: is it running? "
            f"(kubectl -n {namespace} get pods; its log says ca_bundle.*)"
        )
    return (
        "webhook.manageCaBundle is off: whoever provides the certificate must fill the "
        "caBundle (cert-manager: the cert-manager.io/inject-ca-from annotation)"
    )


def check_ca_bundle(
    webhook_configuration: Obj | Unreadable | None,
    ca_secret: Obj | Unreadable | None,
    config: InjectorConfig,
    now: dt.datetime | None = None,
) -> list[Row]:
    """The webhook configuration's caBundle against the certificate the injector serves.

    The injector's Secret holds the CA each replica issues its serving
    certificate from (ca.crt), or, when another tool provides it, the serving
    certificate itself (tls.crt): the caBundle of every webhook must verify it.
    """
    now = now or dt.datetime.now(dt.UTC)
    check = "caBundle"
    name = config.webhook.configuration_name
    subject = f"MutatingWebhookConfiguration {name}"
    if isinstance(webhook_configuration, Unreadable):
        return [_unreadable(check, subject, "the webhook configuration", webhook_configuration)]
    if webhook_configuration is None:
        return [
            Row(
                check,
                subject,
                "FAIL",
                "not found: the injector is not installed, nothing is injected",
                "install it: kubectl apply -k manifests/base (see docs/check.md)",
            )
        ]
    bundles = _bundles(webhook_configuration)
    if not bundles:
        return [Row(check, subject, "FAIL", "it has no webhooks", "apply manifests/base again")]
    blocked = "the apiserver's TLS calls to the injector fail: " + _without_injector(
        webhook_configuration, config
    )
    problems: list[str] = []
    certs: dict[str, list[x509.Certificate]] = {}
    for hook, bundle in bundles:
        parsed = _certificates(bundle) if bundle else []
        if bundle is None:
            problems.append(f"webhook {hook}: the caBundle is not base64")
        elif not bundle:
            problems.append(f"webhook {hook}: the caBundle is empty")
        elif not parsed:
            problems.append(f"webhook {hook}: the caBundle holds no PEM certificate")
        elif not any(_valid_at(c, now) for c in parsed):
            problems.append(f"webhook {hook}: every certificate in the caBundle has expired")
        certs[hook] = parsed
    if problems:
        return [
            Row(check, subject, "FAIL", "; ".join(problems) + f": {blocked}", _bundle_fix(config))
        ]
    secret_name = f"{config.webhook.namespace}/{config.webhook.ca_secret_name}"
    if isinstance(ca_secret, Unreadable):
        return [_unreadable(check, subject, f"Secret {secret_name}", ca_secret)]
    if ca_secret is None:
        if config.server.self_signed and config.webhook.manage_ca_bundle:
            return [
                Row(
                    check,
                    subject,
                    "FAIL",
                    f"Secret {secret_name}, the CA the injector's serving certificates are "
                    "issued from, is missing (the injector creates it at start)",
                    _bundle_fix(config),
                )
            ]
        return [
            Row(
                check,
                subject,
                "warn",
                f"the caBundle holds {_plural(sum(map(len, certs.values())), 'certificate')}; "
                f"no Secret {secret_name} to check the serving certificate against "
                "(it comes from elsewhere): judged from the endpoints only",
            )
        ]
    served = _secret_bytes(ca_secret, TLS_CERT_KEY)
    if served:
        # A serving certificate in the Secret (cert-manager's kind): verify it as
        # the apiserver would.
        server_name = apiserver_server_name(webhook_configuration, config)
        for hook, bundle in bundles:
            problem = verify_served(served, bundle or b"", server_name, now)
            if problem is not None:
                return [
                    Row(
                        check,
                        subject,
                        "FAIL",
                        f"webhook {hook}: the caBundle does not verify the serving certificate "
                        f"in Secret {secret_name} ({TLS_CERT_KEY}) for {server_name}: {problem}; "
                        f"{blocked}",
                        _bundle_fix(config),
                    )
                ]
        leaf = _certificates(served)[0]
        return [
            Row(
                check,
                subject,
                "ok",
                f"verifies the serving certificate in Secret {secret_name} "
                f"({_describe(leaf)}) for {server_name}",
            )
        ]
    ca_pem = _secret_bytes(ca_secret, CA_CERT_KEY)
    cas = _certificates(ca_pem or b"")
    if not cas:
        return [
            Row(
                check,
                subject,
                "FAIL",
                f"Secret {secret_name} holds no CA certificate ({CA_CERT_KEY}) to issue "
                "serving certificates from (the injector replaces an unusable one)",
                _bundle_fix(config),
            )
        ]
    ca = cas[0]
    if not _valid_at(ca, now):
        return [
            Row(
                check,
                subject,
                "FAIL",
                f"the CA in Secret {secret_name} ({_describe(ca)}) is not valid now: "
                f"the serving certificates it issues are refused; {blocked}",
                _bundle_fix(config),
            )
        ]
    missing = [
        hook for hook, found in certs.items() if not any(_same_certificate(ca, c) for c in found)
    ]
    if missing:
        return [
            Row(
                check,
                subject,
                "FAIL",
                f"the caBundle of webhook {_listed(missing)} does not hold the CA in Secret "
                f"{secret_name} ({_describe(ca)}), which issues every replica's serving "
                f"certificate: {blocked}",
                _bundle_fix(config),
            )
        ]
    others = len({c.fingerprint(hashes.SHA256()) for found in certs.values() for c in found}) - 1
    extra = f" (and {_plural(others, 'older CA')} still trusted)" if others > 0 else ""
    return [
        Row(
            check,
            subject,
            "ok",
            f"trusts the CA in Secret {secret_name} ({_describe(ca)}), the issuer of every "
            f"replica's serving certificate{extra}",
        )
    ]


def check_endpoints(
    webhook_configuration: Obj | Unreadable | None,
    endpoints: Endpoints,
    config: InjectorConfig,
    now: dt.datetime | None = None,
) -> list[Row]:
    """Connect to where the apiserver calls the webhook; the caBundle must verify what is served."""
    now = now or dt.datetime.now(dt.UTC)
    check = "webhook endpoint"
    if not isinstance(webhook_configuration, Mapping) or endpoints.kind == "none":
        return []  # the caBundle row says why
    bundle = dict(_bundles(webhook_configuration)).get(
        str(_ours(webhook_configuration, config).get("name"))
    )
    if endpoints.kind == "service" and endpoints.ready == 0:
        return [
            Row(
                check,
                f"Service {endpoints.target}",
                "FAIL",
                "no ready endpoint: no injector pod is ready to answer, so "
                + _without_injector(webhook_configuration, config),
                f"kubectl -n {config.webhook.namespace} get pods,endpointslices; its /readyz "
                "waits for the caBundle (log: readyz.*)",
            )
        ]
    reached = [p for p in endpoints.probes if p.leaf_pem is not None]
    if not reached:
        why = "; ".join(f"{p.address}: {p.error}" for p in endpoints.probes) or "nothing to try"
        if endpoints.kind == "url":
            return [
                Row(
                    check,
                    endpoints.target,
                    "warn",
                    f"not reachable from here ({why}): the serving certificate was checked "
                    "against the Secret only (caBundle line)",
                    "is the injector running? (the apiserver may reach it where this check cannot)",
                )
            ]
        ready = "" if endpoints.ready is None else f"{_plural(endpoints.ready, 'ready endpoint')}, "
        return [
            Row(
                check,
                f"Service {endpoints.target}",
                "ok",
                f"{ready}not reachable from here ({why}): the serving certificate was checked "
                "against the Secret only (caBundle line); run the check inside the cluster "
                "network to verify what each replica serves",
            )
        ]
    rows = []
    for probe in reached:
        assert probe.leaf_pem is not None
        problem = verify_served(probe.leaf_pem, bundle or b"", probe.server_name, now)
        leaf = _certificates(probe.leaf_pem)
        shown = _describe(leaf[0]) if leaf else "an unreadable certificate"
        if problem is None:
            rows.append(
                Row(
                    check,
                    probe.address,
                    "ok",
                    f"connected: presents {shown}, which the caBundle verifies for "
                    f"{probe.server_name}",
                )
            )
        else:
            rows.append(
                Row(
                    check,
                    probe.address,
                    "FAIL",
                    f"connected: presents {shown}, which the caBundle does not verify for "
                    f"{probe.server_name} ({problem}): the apiserver's calls fail TLS, so "
                    + _without_injector(webhook_configuration, config),
                    _bundle_fix(config),
                )
            )
    for probe in endpoints.probes:
        if probe.leaf_pem is None:
            rows.append(
                Row(check, probe.address, "warn", f"not reachable from here: {probe.error}")
            )
    return rows


# -- namespaces


def _active(namespace: Obj) -> bool:
    return bool(_dig(namespace, "status", "phase") != "Terminating")


def opted_in_namespaces(namespaces: Iterable[Obj], config: InjectorConfig) -> list[str]:
    """The namespaces whose Bento pods are injected (not terminating), sorted."""
    return sorted(
        _name(ns) for ns in namespaces if _active(ns) and opted_in(_name(ns), _labels(ns), config)
    )


def check_namespaces(namespaces: Sequence[Obj] | Unreadable, config: InjectorConfig) -> list[Row]:
    """Which namespaces are opted in; any Pod Security level works for them."""
    check = "namespaces"
    if isinstance(namespaces, Unreadable):
        return [_unreadable(check, "namespaces", "namespaces", namespaces)]
    keys = config.labels
    opt_in = f"{keys.namespace_opt_in}={keys.namespace_opt_in_value}"
    rows = []
    for ns in sorted(namespaces, key=_name):
        name, labels = _name(ns), _labels(ns)
        if name in config.excluded_namespaces and labels.get(keys.namespace_opt_in) == (
            keys.namespace_opt_in_value
        ):
            rows.append(
                Row(
                    check,
                    f"namespace {name}",
                    "warn",
                    f"labelled {opt_in}, but the injector never mutates it "
                    "(a system namespace, or its own)",
                    f"run Bentos in another namespace; kubectl label namespace {name} "
                    f"{keys.namespace_opt_in}-",
                )
            )
    opted = opted_in_namespaces(namespaces, config)
    if not opted:
        rows.append(
            Row(
                check,
                "namespaces",
                "warn",
                f"no namespace is labelled {opt_in}: nothing is injected",
                f"kubectl label namespace NAME {opt_in}",
            )
        )
        return rows
    rows.append(
        Row(
            check,
            "namespaces",
            "ok",
            f"{_plural(len(opted), 'namespace')} opted in: {_listed(opted)}; any Pod Security "
            f"level works (the injected {config.sidecar.container_name} sidecar passes restricted)",
        )
    )
    return rows


# -- credentials


def _keys(secret: Obj) -> list[str]:
    return sorted((secret.get("data") or {}).keys())


def check_credentials(
    namespaces: Sequence[Obj] | Unreadable,
    sources: Mapping[str, Obj | Unreadable | None],
    copies: Mapping[tuple[str, str], Obj | Unreadable | None],
    config: InjectorConfig,
) -> list[Row]:
    """The credentials Secret in the injector's namespace, and its copy in each opted-in one.

    The sidecar reads metaurl (required) and access-key/secret-key (optional:
    when the metadata engine does not hold them) by secretKeyRef; a missing
    Secret or metaurl leaves the pod in CreateContainerConfigError.
    """
    check = "credentials"
    jfs = config.juicefs
    required, optional = jfs.meta_url_key, (jfs.access_key_key, jfs.secret_key_key)
    home = config.webhook.namespace
    default_secret = jfs.secret_name_template.format(volume=jfs.default_volume)
    opted = [] if isinstance(namespaces, Unreadable) else opted_in_namespaces(namespaces, config)
    rows = []
    for secret_name in credential_secret_names(config):
        subject = f"Secret {home}/{secret_name}"
        # Pods use the default volume's Secret unless an annotation picks another volume.
        needed = secret_name == default_secret
        verdict: Verdict = "FAIL" if needed else "warn"
        users = "every Bento pod" if needed else "pods whose annotation picks its volume"
        source = sources.get(secret_name)
        if isinstance(source, Unreadable):
            rows.append(_unreadable(check, subject, "it", source))
            continue
        if source is None:
            rows.append(
                Row(
                    check,
                    subject,
                    verdict,
                    f"not found: {users} would start without credentials "
                    "(CreateContainerConfigError)",
                    f"kubectl -n {home} create secret generic {secret_name} "
                    f"--from-literal={required}=META-URL "
                    f"[--from-literal={optional[0]}=... --from-literal={optional[1]}=...]",
                )
            )
            continue
        value = _secret_bytes(source, required)
        if not value:
            rows.append(
                Row(
                    check,
                    subject,
                    verdict,
                    f"no {required} key"
                    + (" (it is empty)" if value == b"" else "")
                    + f" (keys: {', '.join(_keys(source)) or 'none'}): {users} would fail",
                    f"add it: kubectl -n {home} patch secret {secret_name} --type merge "
                    f'-p \'{{"stringData":{{"{required}":"META-URL"}}}}\'',
                )
            )
            continue
        present = [k for k in optional if k in (source.get("data") or {})]
        note = (
            f", {', '.join(present)}"
            if present
            else " (no object-store keys: the metadata holds them)"
        )
        rows.append(Row(check, subject, "ok", f"keys {required}{note}; values not shown"))
        source_data = dict(source.get("data") or {})
        for namespace in opted:
            rows.append(_check_copy(namespace, secret_name, copies, source_data, verdict, config))
    return rows


def _check_copy(
    namespace: str,
    secret_name: str,
    copies: Mapping[tuple[str, str], Obj | Unreadable | None],
    source_data: Mapping[str, str],
    verdict: Verdict,
    config: InjectorConfig,
) -> Row:
    check = "credentials"
    subject = f"Secret {namespace}/{secret_name}"
    required = config.juicefs.meta_url_key
    controller = (
        "the injector's namespace controller copies it from "
        f"{config.webhook.namespace} within controller.resyncSeconds: is the injector running? "
        f"(kubectl -n {config.webhook.namespace} get pods; its log says namespace.*)"
    )
    copy = copies.get((namespace, secret_name))
    if isinstance(copy, Unreadable):
        return _unreadable(check, subject, "it", copy)
    if copy is None:
        return Row(
            check,
            subject,
            verdict,
            "no copy in this opted-in namespace: its Bento pods fail with "
            "CreateContainerConfigError",
            controller,
        )
    ours = _labels(copy).get("app.kubernetes.io/managed-by") == config.controller.managed_by
    if not _secret_bytes(copy, required):
        fix = (
            controller
            if ours
            else f"it is not the injector's (no app.kubernetes.io/managed-by="
            f"{config.controller.managed_by}): add {required}, or delete it so the "
            "injector makes its copy"
        )
        return Row(
            check,
            subject,
            verdict,
            f"the copy has no {required} key (keys: {', '.join(_keys(copy)) or 'none'}): "
            "its Bento pods fail with CreateContainerConfigError",
            fix,
        )
    if not ours:
        return Row(
            check,
            subject,
            "warn",
            "a Secret that is not the injector's copy (someone else's with this name): "
            "the injector leaves it alone, so it does not follow the source",
            f"delete it if it is stale: kubectl -n {namespace} delete secret {secret_name}",
        )
    if dict(copy.get("data") or {}) != dict(source_data):
        return Row(
            check,
            subject,
            "warn",
            "differs from the source: the copy is stale until the controller applies it again",
            controller,
        )
    return Row(check, subject, "ok", "copied, same keys and values as the source")


# -- the node agent


def _pod_state(pod: Obj) -> tuple[bool, str]:
    """(running and ready, how it is) for one pod."""
    phase = str(_dig(pod, "status", "phase") or "Unknown")
    if _dig(pod, "metadata", "deletionTimestamp"):
        return False, "terminating"
    statuses = _dig(pod, "status", "containerStatuses") or []
    for status in statuses:
        waiting = _dig(status, "state", "waiting")
        if waiting:
            return False, f"{phase}, {status.get('name')} waiting: {waiting.get('reason')}"
    ready = bool(statuses) and all(s.get("ready") for s in statuses)
    if phase == "Running" and ready:
        return True, "running"
    return False, phase + ("" if ready else ", not ready")


def _record_summary(node: Obj) -> tuple[NodeWarmth | None, str]:
    text = (_dig(node, "metadata", "annotations") or {}).get(WARM_ANNOTATION)
    if not text:
        return NodeWarmth(), "no warm-models record yet"
    warmth = NodeWarmth.parse(text)
    if not warmth.records and text.strip() != "[]":
        return None, f"its {WARM_ANNOTATION} annotation is unreadable"
    counts = dict.fromkeys(WARM_STATES, 0)
    for record in warmth.records.values():
        counts[record.state] += 1
    shown = [f"{counts[s]} {s}" for s in ("warm", "warming", "failed")]
    shown += [
        f"{counts[s]} {s}"
        for s in WARM_STATES
        if s not in ("warm", "warming", "failed") and counts[s]
    ]
    return warmth, "Bentos: " + ", ".join(shown)


def check_node_agent(
    nodes: Sequence[Obj] | Unreadable,
    daemonset: Obj | Unreadable | None,
    pods: Sequence[Obj] | Unreadable,
    config: InjectorConfig,
) -> list[Row]:
    """On each SSD node: the agent's pod, and what its record says is warm.

    The agent mounts for every Bento pod on its node, in either cache mode:
    a node without it starts none (FAIL).
    """
    check = "node agent"
    home = config.webhook.namespace
    subject = f"DaemonSet {home}/{NODE_AGENT}"
    if isinstance(daemonset, Unreadable):
        return [_unreadable(check, subject, "it", daemonset)]
    if daemonset is None:
        return [
            Row(
                check,
                subject,
                "FAIL",
                "not installed: the node agent mounts for every Bento pod, so none starts "
                "(each waits for it, its startup probe says so)",
                "kubectl apply -k manifests/base (docs/node-agent.md)",
            )
        ]
    label = config.ssd_node_label
    selector = dict(_dig(daemonset, "spec", "template", "spec", "nodeSelector") or {})
    if isinstance(nodes, Unreadable):
        return [_unreadable(check, subject, "nodes", nodes)]
    if isinstance(pods, Unreadable):
        return [_unreadable(check, subject, "its pods", pods)]
    if label is not None:
        ssd = [n for n in nodes if has_label(n, label)]
    else:
        ssd = [
            n
            for n in nodes
            if selector and all(_labels(n).get(k) == v for k, v in selector.items())
        ]
    if not ssd:
        return [Row(check, subject, "ok", "installed; no SSD node to check")]
    uid = _dig(daemonset, "metadata", "uid")
    by_node: dict[str, list[Obj]] = {}
    for pod in pods:
        owners = _dig(pod, "metadata", "ownerReferences") or []
        if uid and not any(o.get("uid") == uid for o in owners):
            continue
        by_node.setdefault(str(_dig(pod, "spec", "nodeName") or ""), []).append(pod)
    rows = []
    for node in sorted(ssd, key=_name):
        name = _name(node)
        warmth, record = _record_summary(node)
        on_node = by_node.get(name, [])
        states = [(_name(p), *_pod_state(p)) for p in on_node]
        running = [s for s in states if s[1]]
        verdict: Verdict = "ok" if running else "FAIL"
        if running:
            found, fix = f"pod {running[0][0]} running; {record}", ""
        elif states:
            pod_name, _, how = states[0]
            found = f"pod {pod_name} is {how}; {record}"
            fix = f"kubectl -n {home} describe pod {pod_name}"
        else:
            wanted = ", ".join(f"{k}={v}" for k, v in sorted(selector.items())) or "every node"
            found = f"no agent pod on this node (the DaemonSet selects {wanted}); {record}"
            fix = "make the DaemonSet's nodeSelector and tolerations match this node"
        # A record unread or a failed warm is a warning; never one that hides a FAIL.
        if warmth is None:
            verdict = "warn" if verdict == "ok" else verdict
        elif warmth.records:
            failed = [r for r in warmth.records.values() if r.state == "failed"]
            if failed:
                verdict = "warn" if verdict == "ok" else verdict
                shown = _listed(
                    [
                        f"{r.bento.name}:{r.bento.version}"
                        + (f" ({r.message})" if r.message else "")
                        for r in failed
                    ]
                )
                found += f"; failed: {shown}"
                fix = fix or (
                    f"kubectl describe node {name} (the agent's Events), and "
                    f"kubectl -n {home} logs {running[0][0] if running else 'AGENT-POD'}"
                )
        rows.append(Row(check, f"node {name}", verdict, found, fix))
    return rows


# -- all of it -------------------------------------------------------------------------


def run_checks(
    state: ClusterState, config: InjectorConfig, now: dt.datetime | None = None
) -> list[Row]:
    """Every check's rows, in the order of the table."""
    now = now or dt.datetime.now(dt.UTC)
    return [
        *check_version(state.version, config),
        *check_ssd_nodes(state.nodes, config),
        *check_streaming_nodes(state.nodes, config),
        *check_ca_bundle(state.webhook, state.ca_secret, config, now),
        *check_endpoints(state.webhook, state.endpoints, config, now),
        *check_namespaces(state.namespaces, config),
        *check_credentials(state.namespaces, state.sources, state.copies, config),
        *check_node_agent(state.nodes, state.daemonset, state.agent_pods, config),
    ]


def exit_code(rows: Iterable[Row]) -> int:
    """1 when something blocks injection (a FAIL), else 0."""
    return 1 if any(row.verdict == "FAIL" for row in rows) else 0


def render(rows: Sequence[Row], heading: str = "") -> str:
    """The table: VERDICT, CHECK, ON, FOUND; what to do on a `fix:` line below a row."""
    header = ("VERDICT", "CHECK", "ON", "FOUND")
    cells = [(row.verdict, row.check, row.subject, row.found) for row in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(3)]
    indent = " " * (sum(widths) + 2 * 3)

    def line(cols: tuple[str, str, str, str]) -> str:
        return "  ".join(col.ljust(width) for col, width in zip(cols[:3], widths, strict=True)) + (
            "  " + cols[3]
        )

    out = [heading] if heading else []
    out.append(line(header))
    for row, cols in zip(rows, cells, strict=True):
        out.append(line(cols))
        if row.fix:
            out.append(f"{indent}fix: {row.fix}")
    counts = {verdict: sum(row.verdict == verdict for row in rows) for verdict in VERDICTS}
    summary = f"{counts['FAIL']} FAIL, {counts['warn']} warn, {counts['ok']} ok: "
    if counts["FAIL"]:
        summary += "something blocks injection (the FAIL lines say what to do)"
    else:
        summary += "nothing blocks injection"
    out += ["", summary]
    return "\n".join(out) + "\n"


# -- the one I/O part ------------------------------------------------------------------


class _Api:
    """GETs by path through the kubernetes_asyncio ApiClient: the API's JSON, as served."""

    def __init__(self, api: Any) -> None:
        self._api = api

    async def get(self, path: str, **query: str) -> Any:
        return await self._api.call_api(
            path,
            "GET",
            query_params=list(query.items()),
            header_params={"Accept": "application/json"},
            response_types_map={200: "object"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _request_timeout=30,
        )

    async def maybe(self, path: str, **query: str) -> Obj | Unreadable | None:
        """The object, None when it does not exist, Unreadable when the API refuses."""
        try:
            return dict(await self.get(path, **query))
        except ApiException as err:
            if err.status == 404:
                return None
            return Unreadable(f"{err.status} {err.reason}")

    async def items(self, path: str, **query: str) -> list[Obj] | Unreadable:
        found = await self.maybe(path, **query)
        if found is None:
            return Unreadable("404 Not Found")
        if isinstance(found, Unreadable):
            return found
        return list(found.get("items") or [])


async def probe_tls(
    host: str, port: int, server_name: str, seconds: float = PROBE_TIMEOUT
) -> Probe:
    """Connect and take the leaf certificate presented, unverified (the check judges it)."""
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=server_name),
            seconds,
        )
    except (OSError, TimeoutError, ssl.SSLError) as err:
        return Probe(address, server_name, error=str(err) or type(err).__name__)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    if not der:
        return Probe(address, server_name, error="no certificate presented")
    return Probe(address, server_name, leaf_pem=ssl.DER_cert_to_PEM_cert(der).encode())


async def fetch_endpoints(
    api: _Api, webhook: Obj | Unreadable | None, config: InjectorConfig
) -> Endpoints:
    """Where the apiserver calls the webhook; a handshake with each place reachable from here."""
    if not isinstance(webhook, Mapping):
        return Endpoints("none", "", "")
    client = _ours(webhook, config).get("clientConfig") or {}
    server_name = apiserver_server_name(webhook, config)
    if client.get("url"):
        url = urlsplit(str(client["url"]))
        host, port = url.hostname or "", url.port or 443
        return Endpoints(
            "url",
            str(client["url"]),
            server_name,
            None,
            (await probe_tls(host, port, server_name),),
        )
    service = client.get("service") or {}
    name = str(service.get("name") or config.webhook.service_name)
    namespace = str(service.get("namespace") or config.webhook.namespace)
    port = int(service.get("port") or 443)
    target = f"{namespace}/{name}"
    svc = await api.maybe(f"/api/v1/namespaces/{namespace}/services/{name}")
    if svc is None:
        return Endpoints("service", target, server_name, 0)
    port_name = None
    if isinstance(svc, Mapping):
        for entry in _dig(svc, "spec", "ports") or []:
            if int(entry.get("port") or 0) == port:
                port_name = entry.get("name") or ""
    slices = await api.items(
        f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
        labelSelector=f"kubernetes.io/service-name={name}",
    )
    if isinstance(slices, Unreadable):
        return Endpoints("service", target, server_name, None)
    addresses: list[tuple[str, int]] = []
    for item in slices:
        ports = [
            int(p["port"])
            for p in item.get("ports") or []
            if port_name is None or (p.get("name") or "") == port_name
        ]
        for endpoint in item.get("endpoints") or []:
            if _dig(endpoint, "conditions", "ready") is False:
                continue
            addresses += [
                (address, p) for address in endpoint.get("addresses") or [] for p in ports[:1]
            ]
    probes = await asyncio.gather(
        *(probe_tls(host, p, server_name) for host, p in sorted(set(addresses))[:MAX_PROBES])
    )
    return Endpoints("service", target, server_name, len(set(addresses)), tuple(probes))


async def fetch(api_client: Any, config: InjectorConfig) -> ClusterState:
    """Read everything the checks need. Raises only when the apiserver cannot be reached."""
    api = _Api(api_client)
    home = config.webhook.namespace
    version = dict(await api.get("/version"))
    nodes = await api.items("/api/v1/nodes")
    namespaces = await api.items("/api/v1/namespaces")
    webhook = await api.maybe(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"
        + config.webhook.configuration_name
    )
    ca_secret = await api.maybe(
        f"/api/v1/namespaces/{home}/secrets/{config.webhook.ca_secret_name}"
    )
    endpoints = await fetch_endpoints(api, webhook, config)
    names = credential_secret_names(config)
    sources = {name: await api.maybe(f"/api/v1/namespaces/{home}/secrets/{name}") for name in names}
    opted = [] if isinstance(namespaces, Unreadable) else opted_in_namespaces(namespaces, config)
    wanted = [(ns, name) for ns in opted for name in names]
    found = await asyncio.gather(
        *(api.maybe(f"/api/v1/namespaces/{ns}/secrets/{name}") for ns, name in wanted)
    )
    daemonset = await api.maybe(f"/apis/apps/v1/namespaces/{home}/daemonsets/{NODE_AGENT}")
    pods: list[Obj] | Unreadable = []
    if isinstance(daemonset, Mapping):
        match = _dig(daemonset, "spec", "selector", "matchLabels") or {}
        selector = ",".join(f"{k}={v}" for k, v in sorted(match.items()))
        pods = await api.items(f"/api/v1/namespaces/{home}/pods", labelSelector=selector)
    return ClusterState(
        version=version,
        nodes=nodes,
        namespaces=namespaces,
        webhook=webhook,
        ca_secret=ca_secret,
        endpoints=endpoints,
        sources=sources,
        copies=dict(zip(wanted, found, strict=True)),
        daemonset=daemonset,
        agent_pods=pods,
    )


class Unreachable(Exception):
    """No cluster to check: the kubeconfig does not load, or the apiserver does not answer."""


async def check_cluster(kubeconfig: str | None, config: InjectorConfig) -> tuple[list[Row], str]:
    """Fetch and check: the rows, and where the cluster is (for the heading)."""
    try:
        api = await new_api_client(kubeconfig)
    except Exception as err:  # the loader raises anything on a bad file (TypeError on an empty one)
        raise Unreachable(f"cannot load the kubeconfig: {type(err).__name__}: {err}") from err
    host = str(api.configuration.host)
    try:
        state = await fetch(api, config)
    except (ApiException, aiohttp.ClientError, OSError, TimeoutError) as err:
        raise Unreachable(f"cannot reach {host}: {type(err).__name__}: {err}") from err
    finally:
        await api.close()
    return run_checks(state, config), host
