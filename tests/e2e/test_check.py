"""`python -m injector check` on the local cluster, run as a user runs it, and each FAIL made real.

The healthy cluster first: every line ok (the node agent runs on the node),
exit 0; a namespace that enforces `restricted` changes nothing. Then each
blocking line is made to fail for real and put back: an SSD node without an
agent pod; nodes without the profile's SSD and image-streaming labels; a
caBundle that trusts another CA (with the injector stopped, and then serving
while it cannot repair the bundle, so the handshake itself fails); a
credentials Secret without its metaurl key, in the injector's namespace and
in a copy. Every change is undone, and the last check of each test passes
again: other tests share the cluster.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.warm import WARM_ANNOTATION, BentoRef, NodeWarmth, WarmRecord
from devcluster import Cluster, wait_for
from devcluster.binaries import ensure_binaries
from devcluster.installs.injector_install import CREDENTIALS_SECRET, NAMESPACE, InjectorInstall
from devcluster.installs.injector_pods import RELEASE, RELEASE_NAMESPACE, PodInjector
from devcluster.installs.node_agent import LocalNodeAgent
from devcluster.node.node import Node
from injector.pki.authority import generate_ca
from tests.e2e.pods import opted_in_namespace

REPO = Path(__file__).resolve().parents[2]
ENFORCE = "pod-security.kubernetes.io/enforce"
SSD = "cloud.google.com/gke-ephemeral-storage-local-ssd"
STREAMING = "cloud.google.com/gke-image-streaming"
WEBHOOK = "bento-juicefs-injector"
CA_BUNDLE = "MutatingWebhookConfiguration bento-juicefs-injector"
SOURCE = f"Secret {NAMESPACE}/{CREDENTIALS_SECRET}"


@dataclass(frozen=True)
class Line:
    verdict: str
    found: str
    fix: str


@dataclass(frozen=True)
class Checked:
    code: int
    out: str
    lines: dict[tuple[str, str], Line]

    def line(self, check_id: str, subject: str) -> Line:
        assert (check_id, subject) in self.lines, f"no line {check_id} / {subject}:\n{self.out}"
        return self.lines[(check_id, subject)]

    def subjects(self, check_id: str) -> list[str]:
        return [subject for (name, subject) in self.lines if name == check_id]

    def failing(self) -> list[tuple[str, str]]:
        return [key for key, line in self.lines.items() if line.verdict == "FAIL"]


def parse_table(out: str) -> dict[tuple[str, str], Line]:
    """The table as a user reads it: columns from the header, `fix:` lines under their row."""
    text = out.splitlines()
    start = next(i for i, line in enumerate(text) if line.startswith("VERDICT "))
    header = text[start]
    id_at, on_at, found_at = (header.index(word) for word in (" ID ", " ON ", " FOUND"))
    rows: dict[tuple[str, str], Line] = {}
    last: tuple[str, str] | None = None
    for line in text[start + 1 :]:
        if not line.strip():
            break
        if line[: found_at + 1].strip() == "" and line.strip().startswith("fix: "):
            assert last is not None
            rows[last] = Line(rows[last].verdict, rows[last].found, line.strip()[len("fix: ") :])
            continue
        key = (line[id_at:on_at].strip(), line[on_at:found_at].strip())
        rows[key] = Line(line[: id_at + 1].strip(), line[found_at:].strip(), "")
        last = key
    return rows


def run_check(
    cluster: Cluster, config: Path, *, via_env: bool = False, expect: int | None = None
) -> Checked:
    """`python -m injector check`, as a user runs it (--kubeconfig, or KUBECONFIG)."""
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    args = [sys.executable, "-m", "injector", "check", "--config", str(config)]
    if via_env:
        env["KUBECONFIG"] = str(cluster.kubeconfig)
    else:
        args += ["--kubeconfig", str(cluster.kubeconfig)]
    proc = subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    print(proc.stdout)
    assert proc.returncode in (0, 1), proc.stderr
    checked = Checked(proc.returncode, proc.stdout, parse_table(proc.stdout))
    if expect is not None:
        assert checked.code == expect, f"exit {checked.code}, FAIL on {checked.failing()}"
    return checked


@pytest.fixture(autouse=True)
def agent_pod(node_agent: LocalNodeAgent) -> str:
    """The node agent's pod on the local node: without it every check here fails."""
    return node_agent.ensure_running()


@pytest.fixture(scope="module")
def namespace(cluster: Cluster, injector: InjectorInstall) -> Iterator[str]:
    with opted_in_namespace(cluster, "e2e-check") as name:
        yield name


def write_config(path: Path, base: Path, **changes: Any) -> Path:
    """The local injector's config with some sections merged in."""
    config = yaml.safe_load(base.read_text())
    for section, values in changes.items():
        config[section] = {**config.get(section, {}), **values}
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def fake_node(
    cluster: Cluster, labels: dict[str, str], annotations: dict[str, str] | None = None
) -> Iterator[str]:
    """A Node with no kubelet, tainted so nothing (the agent's DaemonSet included) goes there."""
    name = f"e2e-check-{uuid.uuid4().hex[:6]}"
    cluster.register_fake_node(name)
    taint = [{"key": "e2e-check", "value": "fake", "effect": "NoSchedule"}]
    cluster.kubectl("patch", "node", name, "--type=json", "-p", json.dumps(
        [{"op": "add", "path": "/spec/taints", "value": taint}]
    ))  # fmt: skip
    # Labelled once tainted: the DaemonSet never makes a pod for it.
    cluster.kubectl("label", "node", name, *(f"{k}={v}" for k, v in labels.items()))
    if annotations:
        cluster.kubectl("annotate", "node", name, *(f"{k}={v}" for k, v in annotations.items()))
    try:
        yield name
    finally:
        cluster.kubectl("delete", "node", name, "--wait=false", check=False)


def test_a_healthy_cluster_passes(
    cluster: Cluster, node: Node, injector: InjectorInstall, namespace: str, agent_pod: str
) -> None:
    checked = run_check(cluster, injector.config_file, via_env=True, expect=0)
    server = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    version = checked.line("server-version", "cluster")
    assert version.verdict == "ok"
    assert version.found.startswith(f"{server['gitVersion']}: native sidecars (1.29+)")
    ssd = checked.line("ssd-nodes", f"{SSD}=true")
    assert ssd.verdict == "ok"
    assert node.name in ssd.found
    assert checked.line("streaming-nodes", f"{STREAMING}=true").verdict == "ok"
    bundle = checked.line("webhook-cabundle", CA_BUNDLE)
    assert bundle.verdict == "ok"
    assert f"trusts the CA in Secret {NAMESPACE}/bento-juicefs-injector-ca" in bundle.found
    endpoints = injector.endpoints()
    assert endpoints
    for address in endpoints:  # each replica, as the apiserver reaches it
        endpoint = checked.line("webhook-endpoint", address)
        assert endpoint.verdict == "ok"
        assert f"which the caBundle verifies for {injector.server_name}" in endpoint.found
    namespaces = checked.line("namespaces-opted-in", "namespaces")
    assert namespaces.verdict == "ok"
    assert "opted in: " in namespaces.found
    assert namespaces.found.endswith(
        "; any Pod Security level works (the injected juicefs-mount sidecar passes restricted)"
    )
    assert checked.subjects("pod security") == []
    assert checked.line("credentials-source", SOURCE).verdict == "ok"
    copy = checked.line("credentials-copy", f"Secret {namespace}/{CREDENTIALS_SECRET}")
    assert copy.found == "copied, same keys and values as the source"
    agent = checked.line("node-agent", f"node {node.name}")
    assert agent.verdict == "ok"
    assert agent.found.startswith(f"pod {agent_pod} running; ")
    assert checked.out.rstrip().endswith("nothing blocks injection")


def test_helm_test_runs_the_check_in_the_cluster_and_leaves_no_reader_behind(
    cluster: Cluster, injector: InjectorInstall, namespace: str
) -> None:
    """`helm test` of the release: the check in the injector's own image, in a pod with
    the test's read-only identity, which is gone once the test passed."""
    if not isinstance(injector, PodInjector) or injector.method != "helm":
        pytest.skip("the injector is not a Helm release here")
    helm = ensure_binaries(["helm"])["helm"]
    proc = subprocess.run(
        [
            str(helm), "test", RELEASE, "--namespace", RELEASE_NAMESPACE,
            "--kubeconfig", str(cluster.kubeconfig), "--timeout", "3m",
        ],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = cluster.kubectl("logs", "bento-juicefs-check", "-n", NAMESPACE).stdout
    rows = parse_table(log)
    assert rows[("credentials-copy", f"Secret {namespace}/{CREDENTIALS_SECRET}")].verdict == "ok"
    assert log.rstrip().endswith("nothing blocks injection")
    pod = cluster.get_json("pod", "bento-juicefs-check", "-n", NAMESPACE)
    assert pod["status"]["phase"] == "Succeeded"  # kept for its log
    for kind in ("clusterrolebinding", "clusterrole"):
        gone = cluster.kubectl("get", kind, "bento-juicefs-check", check=False)
        assert gone.returncode != 0, f"{kind} bento-juicefs-check outlived the test"
    cluster.kubectl("delete", "pod", "bento-juicefs-check", "-n", NAMESPACE, "--wait=false")


def test_a_namespace_that_enforces_restricted_is_fine(
    cluster: Cluster, injector: InjectorInstall, namespace: str
) -> None:
    """What the injector adds passes restricted: no level is a finding any more."""
    for level in ("restricted", "baseline"):
        cluster.kubectl("label", "namespace", namespace, f"{ENFORCE}={level}", "--overwrite")
        try:
            checked = run_check(cluster, injector.config_file, expect=0)
            assert checked.line("namespaces-opted-in", "namespaces").verdict == "ok"
            assert namespace in checked.out
        finally:
            cluster.kubectl("label", "namespace", namespace, f"{ENFORCE}-")


def test_a_classic_sidecar_config_on_a_native_server_is_a_warning(
    cluster: Cluster, injector: InjectorInstall, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "classic.yaml", injector.config_file, cluster={"kubernetesVersion": "1.28"}
    )
    checked = run_check(cluster, config, expect=0)
    line = checked.line("server-version", "cluster")
    assert line.verdict == "warn"
    assert "cluster.kubernetesVersion 1.28 makes the injector add a classic one" in line.found


def test_an_ssd_node_without_an_agent_pod_fails_and_its_record_is_read(
    cluster: Cluster, node: Node, injector: InjectorInstall, namespace: str, agent_pod: str
) -> None:
    """The agent mounts for every Bento pod: a node it does not run on starts none."""
    warm, failed = BentoRef("models", "summarizer", "v3"), BentoRef("models", "llama3", "v1")
    record = NodeWarmth(
        {
            warm: WarmRecord(warm, "warm", 1 << 20, verified=True),
            failed: WarmRecord(failed, "failed", message="sha256 mismatch in model.safetensors"),
        }
    ).render()
    with fake_node(cluster, {SSD: "true"}, {WARM_ANNOTATION: record}) as fake:
        checked = run_check(cluster, injector.config_file, expect=1)
        real = checked.line("node-agent", f"node {node.name}")
        assert real.verdict == "ok"
        assert real.found.startswith(f"pod {agent_pod} running; ")
        other = checked.line("node-agent", f"node {fake}")
        assert other.verdict == "FAIL"
        assert other.found.startswith(
            f"no agent pod on this node (the DaemonSet selects {SSD}=true); "
            "Bentos: 1 warm, 0 warming, 1 failed; failed: llama3:v1 (sha256 mismatch"
        )
        assert other.fix == "make the DaemonSet's nodeSelector and tolerations match this node"
        assert checked.failing() == [("node-agent", f"node {fake}")]
        assert "2 of" in checked.line("ssd-nodes", f"{SSD}=true").found
    run_check(cluster, injector.config_file, expect=0)


def test_nodes_without_the_profiles_labels_fail(
    cluster: Cluster, injector: InjectorInstall, tmp_path: Path
) -> None:
    """A profile whose SSD and streaming labels only a fake node has; then not even it."""
    suffix = uuid.uuid4().hex[:6]
    ssd, stream = f"check.e2e.example.com/ssd-{suffix}", f"check.e2e.example.com/stream-{suffix}"
    base = yaml.safe_load(injector.config_file.read_text())
    profile = {
        "ssdNodeLabel": {"key": ssd, "value": "true"},
        "nodeCachePath": base["cache"]["nodePath"],
        "streamingNodeLabel": {"key": stream, "value": None},
        "streamingAffinity": "required",
        "description": "e2e profile",
    }
    config = write_config(
        tmp_path / "profile.yaml",
        injector.config_file,
        cluster={"platformProfile": "e2e", "profiles": {"e2e": profile}},
    )
    with fake_node(cluster, {ssd: "true", stream: "yes"}) as fake:
        # The fake node has no agent pod (nothing runs there): that alone fails.
        checked = run_check(cluster, config, expect=1)
        assert checked.failing() == [("node-agent", f"node {fake}")]
        assert checked.line("ssd-nodes", f"{ssd}=true").found.endswith(f": {fake}")
        assert checked.line("streaming-nodes", stream).verdict == "ok"

        cluster.kubectl("label", "node", fake, f"{ssd}-")
        checked = run_check(cluster, config, expect=1)
        line = checked.line("ssd-nodes", f"{ssd}=true")
        assert line.verdict == "FAIL"
        assert "no node of" in line.found
        assert "so they stay Pending" in line.found
        assert f"kubectl label node NAME {ssd}=true" in line.fix
        assert checked.line("streaming-nodes", stream).verdict == "ok"

        cluster.kubectl("label", "node", fake, f"{stream}-")
        checked = run_check(cluster, config, expect=1)
        line = checked.line("streaming-nodes", stream)
        assert line.verdict == "FAIL"
        assert line.found.startswith("profile e2e (e2e profile), required: no node of")
        assert "cluster.profiles.e2e.streamingAffinity: preferred" in line.fix
        assert set(checked.failing()) == {
            ("ssd-nodes", f"{ssd}=true"),
            ("streaming-nodes", stream),
        }


def ca_bundles(cluster: Cluster) -> list[str]:
    hooks = cluster.get_json("mutatingwebhookconfiguration", WEBHOOK)["webhooks"]
    return [str(hook["clientConfig"].get("caBundle", "")) for hook in hooks]


def set_ca_bundles(cluster: Cluster, bundles: list[str]) -> None:
    patch = [
        {"op": "replace", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle}
        for i, bundle in enumerate(bundles)
    ]
    cluster.kubectl(
        "patch", "mutatingwebhookconfiguration", WEBHOOK, "--type=json", "-p", json.dumps(patch)
    )


@contextmanager
def injector_stopped(injector: InjectorInstall) -> Iterator[None]:
    """The shared injector stopped (nothing repairs the caBundle or the copies); back after."""
    injector.stop()
    try:
        injector.wait_unreachable()
        yield
    finally:
        injector.start()


def injector_that_cannot_repair(injector: InjectorInstall) -> AbstractContextManager[None]:
    """The injector serving its certificate at its usual address, but keeping no caBundle
    and no namespaces (webhook.manageCaBundle and the controller off): as with
    certificates from elsewhere whose CA nobody put in the bundle."""
    return injector.reconfigured(
        {"webhook": {"manageCaBundle": False}, "controller": {"enabled": False}}
    )


def test_a_caBundle_that_does_not_verify_the_serving_certificate_fails(
    cluster: Cluster, injector: InjectorInstall, namespace: str, tmp_path: Path
) -> None:
    original = ca_bundles(cluster)
    wrong = base64.b64encode(generate_ca("someone-elses-ca")[0]).decode()
    with injector_stopped(injector):
        try:
            set_ca_bundles(cluster, [wrong for _ in original])
            checked = run_check(cluster, injector.config_file, expect=1)
            line = checked.line("webhook-cabundle", CA_BUNDLE)
            assert line.verdict == "FAIL"
            assert f"does not hold the CA in Secret {NAMESPACE}/bento-juicefs-injector-ca" in (
                line.found
            )
            assert "is it running?" in line.fix
            # Nobody answers: a URL is judged from the Secret only; a Service has no endpoint.
            endpoint = checked.line("webhook-endpoint", injector.url)
            if injector.url.startswith("Service "):
                assert endpoint.verdict == "FAIL"
                assert endpoint.found.startswith("no ready endpoint")
            else:
                assert endpoint.verdict == "warn"
                assert "checked against the Secret only" in endpoint.found

            with injector_that_cannot_repair(injector):
                checked = run_check(cluster, injector.config_file, expect=1)
                assert checked.line("webhook-cabundle", CA_BUNDLE).verdict == "FAIL"
                for address in injector.endpoints():
                    endpoint = checked.line("webhook-endpoint", address)
                    assert endpoint.verdict == "FAIL"
                    assert "presents CN=" in endpoint.found
                    assert (
                        f"which the caBundle does not verify for {injector.server_name}"
                        in endpoint.found
                    )
                assert ca_bundles(cluster) == [wrong for _ in original]  # nobody repaired it
        finally:
            set_ca_bundles(cluster, original)
    wait_for(injector.ready, timeout=30, what="the injector's /readyz")
    run_check(cluster, injector.config_file, expect=0)


def secret_data(cluster: Cluster, namespace: str) -> dict[str, str]:
    return dict(cluster.get_json("secret", CREDENTIALS_SECRET, "-n", namespace)["data"])


def remove_key(cluster: Cluster, namespace: str, key: str) -> None:
    patch = [{"op": "remove", "path": f"/data/{key}"}]
    cluster.kubectl(
        "patch", "secret", CREDENTIALS_SECRET, "-n", namespace, "--type=json", "-p",
        json.dumps(patch),
    )  # fmt: skip


def test_credentials_without_metaurl_fail(
    cluster: Cluster, injector: InjectorInstall, namespace: str
) -> None:
    source = secret_data(cluster, NAMESPACE)
    values = [base64.b64decode(value).decode() for value in source.values()]
    copy_subject = f"Secret {namespace}/{CREDENTIALS_SECRET}"
    with injector_stopped(injector):  # its namespace controller would repair the copy
        try:
            remove_key(cluster, namespace, "metaurl")
            checked = run_check(cluster, injector.config_file, expect=1)
            line = checked.line("credentials-copy", copy_subject)
            assert line.verdict == "FAIL"
            assert line.found.startswith("the copy has no metaurl key")
            assert "CreateContainerConfigError" in line.found
            assert checked.line("credentials-source", SOURCE).verdict == "ok"

            cluster.kubectl("delete", "secret", CREDENTIALS_SECRET, "-n", namespace)
            checked = run_check(cluster, injector.config_file, expect=1)
            assert checked.line("credentials-copy", copy_subject).found.startswith(
                "no copy in this opted-in namespace"
            )

            remove_key(cluster, NAMESPACE, "metaurl")
            checked = run_check(cluster, injector.config_file, expect=1)
            line = checked.line("credentials-source", SOURCE)
            assert line.verdict == "FAIL"
            assert line.found.startswith("no metaurl key")
            assert not [value for value in values if value in checked.out]  # never printed
        finally:
            cluster.kubectl(
                "patch", "secret", CREDENTIALS_SECRET, "-n", NAMESPACE, "--type=merge", "-p",
                json.dumps({"data": source}),
            )  # fmt: skip
    # Back up, the namespace controller copies it again.
    wait_for(
        lambda: cluster.kubectl(
            "get", "secret", CREDENTIALS_SECRET, "-n", namespace, check=False
        ).returncode == 0 and secret_data(cluster, namespace) == source,
        timeout=60,
        what="the credentials copied again",
    )  # fmt: skip
    checked = run_check(cluster, injector.config_file, expect=0)
    assert checked.line("credentials-copy", copy_subject).verdict == "ok"
