"""Hostile tenants on a shared node: what an opted-in namespace can do cannot reach another's.

Two namespaces that enforce Pod Security `baseline`, unprivileged sidecars,
one node, one Bento in the node cache. The
attacker has what the usual `edit` role gives: exec into its own pod's
containers, its own pods' specs and annotations, tokens for its own
service accounts. After each attack the victim, in the other namespace,
still verifies and serves exactly the published bytes (its app checks the
sha256 of what it reads before it sleeps; a new victim pod starts on the
same node cache). docs/security.md lists each attack and its test.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devcluster import Cluster
from devcluster.installs.node_agent import LocalNodeAgent
from devcluster.node.host import node_cache_dir
from devcluster.node.node import Node
from devcluster.storage.stack import MIB, StorageStack
from modelstore.manifest import Manifest
from tests.e2e.pods import (
    GATE,
    SIDECAR,
    PodIdentity,
    bento_labels,
    checking_pod,
    condition,
    create_pod,
    exec_in,
    get_pod,
    is_ready,
    namespace_enforcing,
    run_until_ready,
    wait_pod,
)

pytestmark = pytest.mark.e2e

BENTO = "shared-llm"
VERSION = "v1"
SHARDS = [16 * MIB, 8 * MIB]
LABELS = bento_labels(BENTO, VERSION)
# A selection of the Bento's one model: the node agent keeps it as node cache blocks
# (a local copy is kept only for pods of every model), so each tenant's pod reads it
# through its own FUSE mount with the node cache lent read-only: what these tests
# attack. A pod the copy serves is lent nothing (test_node_cache).
NODE_MODE = {"juicefs.bentoml.com/cache-mode": "node", "juicefs.bentoml.com/models": "llm:v1"}
CREDENTIALS = "juicefs-models-credentials"


@dataclass(frozen=True)
class Tenants:
    attacker: str
    victim: str


@pytest.fixture(scope="module")
def model(storage: StorageStack, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return storage.publish_random(tmp_path_factory.mktemp("hostile"), BENTO, VERSION, SHARDS)


def pod_of(name: str, model: Manifest, **annotations: str) -> dict[str, Any]:
    shard = max(model.files, key=lambda f: f.size)
    return checking_pod(
        name, LABELS, shard.path, shard.sha256, annotations={**NODE_MODE, **annotations}
    )


@pytest.fixture(scope="module")
def tenants(
    cluster: Cluster, node: Node, node_agent: LocalNodeAgent, model: Manifest
) -> Iterator[Tenants]:
    """Each tenant runs the Bento from the node cache; both Ready."""
    made = Tenants(
        namespace_enforcing(cluster, "baseline", "e2e-attacker"),
        namespace_enforcing(cluster, "baseline", "e2e-victim"),
    )
    run_until_ready(cluster, made.victim, pod_of("victim", model))
    run_until_ready(cluster, made.attacker, pod_of("attacker", model))
    yield made
    for namespace in (made.attacker, made.victim):
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def victim_still_serves(cluster: Cluster, tenants: Tenants, model: Manifest, name: str) -> None:
    """The victim's running pod is Ready, and a new one verifies the published bytes."""
    assert is_ready(get_pod(cluster, tenants.victim, "victim"))
    run_until_ready(cluster, tenants.victim, pod_of(name, model))


def shell(cluster: Cluster, namespace: str, container: str, script: str) -> tuple[int, str]:
    return exec_in(cluster, namespace, "attacker", container, "sh", "-c", script)


def test_exec_in_the_own_sidecar_writes_nowhere_another_pod_reads(
    cluster: Cluster, tenants: Tenants, model: Manifest
) -> None:
    """Every directory the attacker's sidecar sees under the node cache, the model and
    the agent's FUSE mount refuses a write; a planted socket or symlink in its own
    volume reaches nothing but its own pod."""
    code, listing = shell(
        cluster,
        tenants.attacker,
        SIDECAR,
        "find /var/lib/juicefs/cache /var/lib/juicefs/mnt /run/bento-juicefs/agent/volume "
        "-maxdepth 6 -type d 2>/dev/null",
    )
    directories = listing.split()
    assert "/var/lib/juicefs/cache" in directories, listing
    assert any("/raw/" in d for d in directories), f"the node cache's blocks: {listing}"
    written = []
    for directory in directories:
        code, said = shell(
            cluster, tenants.attacker, SIDECAR, f"echo planted > '{directory}/planted' 2>&1"
        )
        if code == 0:
            written.append(directory)
        else:
            assert "Read-only file system" in said or "Permission denied" in said, said
    assert not written, f"the attacker's sidecar wrote into {written}"
    # Its own volume: the agent's socket there is the agent's (the volume is
    # sticky: the sidecar cannot replace it); what it plants beside reaches
    # nothing but this pod.
    code, said = shell(
        cluster, tenants.attacker, SIDECAR, "rm -f /run/bento-juicefs/agent/agent.sock 2>&1"
    )
    assert code != 0
    assert "Operation not permitted" in said
    code, said = shell(
        cluster,
        tenants.attacker,
        SIDECAR,
        "cd /run/bento-juicefs/agent && ln -s / planted && ln -s /etc/shadow models && ls -la",
    )
    assert code == 0, said
    victim_still_serves(cluster, tenants, model, "victim-after-exec")


def test_a_block_file_planted_with_a_valid_name_never_reaches_the_victim(
    cluster: Cluster, node: Node, tenants: Tenants, model: Manifest
) -> None:
    """The node cache is the agent's: the attacker's sidecar cannot create, replace
    or truncate a block file there, whatever name or checksum it would carry."""
    code, listing = shell(
        cluster, tenants.attacker, SIDECAR, "find /var/lib/juicefs/cache -type f -name '*_*_*'"
    )
    blocks = listing.split()
    assert code == 0, listing
    assert blocks, "the node cache holds the Bento's blocks"
    for attempt in (
        f"cat /dev/zero | head -c 4 > '{blocks[0]}'",
        f"cp '{blocks[0]}' '{blocks[0]}.new' && mv '{blocks[0]}.new' '{blocks[0]}'",
        f"truncate -s 0 '{blocks[0]}'",
        f"rm -f '{blocks[0]}'",
    ):
        code, said = shell(cluster, tenants.attacker, SIDECAR, f"{attempt} 2>&1")
        assert code != 0, f"{attempt}: {said}"
    victim_still_serves(cluster, tenants, model, "victim-after-blocks")


def test_no_credential_in_a_tenant_pod_opens_the_gate(
    cluster: Cluster, tenants: Tenants, model: Manifest, tmp_path: Path
) -> None:
    """A pod whose gate stays closed (its models annotation names nothing): a token
    bound to it, what its app holds, cannot set models-ready; nor can the app reach
    the sidecar's socket."""
    create_pod(
        cluster,
        tenants.attacker,
        {
            **pod_of("closed", model, **{"juicefs.bentoml.com/models": "no-such-model"}),
        },
    )

    def refused(pod: dict[str, Any]) -> bool:
        # The agent refuses the seal, then the sidecar its own verification.
        gate = condition(pod, GATE)
        refusals = ("SealFailed", "VerificationFailed", "WarmupFailed")
        return gate is not None and gate["reason"] in refusals

    pod = wait_pod(
        cluster, tenants.attacker, "closed", refused, timeout=120, what="the seal refused"
    )
    gate = condition(pod, GATE)
    assert gate is not None
    print(f"gate: {gate}")
    assert gate["status"] == "False"
    assert "no-such-model" in gate["message"]
    own = PodIdentity(cluster, tenants.attacker, "closed", tmp_path)
    patch = {"status": {"conditions": [{"type": GATE, "status": "True", "reason": "Forged"}]}}
    forged = own.patch_status("closed", patch)
    print(forged.stderr)
    assert forged.returncode != 0
    # No RBAC of the namespace lets it (tenants get none); a grant a tenant
    # admin adds is met by the fence (tests/e2e/test_pods_on_node.py).
    assert re.search(r'cannot (get|patch) resource "pods/status"', forged.stderr) or (
        "only the node agent sets its juicefs.bentoml.com/models-ready" in forged.stderr
    ), forged.stderr
    still = condition(get_pod(cluster, tenants.attacker, "closed"), GATE)
    assert still is not None
    assert still["status"] == "False"

    # The app containers have no way to the agent: the socket's volume is the sidecar's.
    # (The seal fails before the app has started: wait for it to run.)
    def app_running(pod: dict[str, Any]) -> bool:
        return any(
            s["name"] == "main" and "running" in (s.get("state") or {})
            for s in pod.get("status", {}).get("containerStatuses") or []
        )

    wait_pod(cluster, tenants.attacker, "closed", app_running, timeout=120, what="its app running")
    code, said = exec_in(
        cluster, tenants.attacker, "closed", "main", "sh", "-c", "ls /run/bento-juicefs 2>&1"
    )
    assert code != 0
    assert "No such file" in said


def test_an_edited_credentials_secret_reaches_only_the_attackers_own_pod(
    cluster: Cluster,
    node: Node,
    storage: StorageStack,
    tenants: Tenants,
    model: Manifest,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The attacker points its copy of the credentials Secret at a JuiceFS volume of its
    own (its own Redis and MinIO, where it is the writer), holding other bytes under
    the victim's Bento name with a crafted manifest.json to match them. Its next pod
    mounts that volume; the node agent seals from the real store with its own
    credentials, never from what a tenant's Secret names. The node cache stays the
    agent's (read-only to that pod), no block of the rogue volume lands in it, and the
    victim still verifies and serves the published bytes."""
    node_cache = node_cache_dir(node.dir) / storage.volume_name
    volumes_before = {p.name for p in node_cache.iterdir() if p.is_dir()}
    scratch = tmp_path_factory.mktemp("rogue")
    rogue = StorageStack(scratch / "stack", host=storage.host).start()
    # Stopped whatever fails: a stack left running would outlive the test.
    try:
        try:
            forged = rogue.publish_random(scratch, BENTO, VERSION, SHARDS)
            # Other shards under the same paths (the small pointer files may match).
            shards = {f.path: f.sha256 for f in model.files if f.size >= MIB}
            assert all(shards[f.path] != f.sha256 for f in forged.files if f.path in shards)
            edit = {"stringData": rogue.writer.secret_data()}
            cluster.kubectl(
                "patch", "secret", CREDENTIALS, "-n", tenants.attacker, "--type=merge",
                "-p", json.dumps(edit),
            )  # fmt: skip
            create_pod(cluster, tenants.attacker, pod_of("rogue", forged))

            def sidecar_running(pod: dict[str, Any]) -> bool:
                return any(
                    s["name"] == SIDECAR and "running" in (s.get("state") or {})
                    for s in pod.get("status", {}).get("initContainerStatuses") or []
                )

            wait_pod(cluster, tenants.attacker, "rogue", sidecar_running, timeout=120,
                     what="the rogue pod's sidecar running")  # fmt: skip
            code, meta_url = exec_in(
                cluster, tenants.attacker, "rogue", SIDECAR, "printenv", "JFS_META_URL"
            )
            assert code == 0
            assert meta_url.strip() == rogue.writer.meta_url, "the pod got the edited Secret"
            time.sleep(15)  # what the rogue pod would do, it has had time to
            outcome = get_pod(cluster, tenants.attacker, "rogue")
            print(f"the rogue pod: Ready={is_ready(outcome)}, gate {condition(outcome, GATE)}")
        finally:
            cluster.kubectl("delete", "pod", "rogue", "-n", tenants.attacker, "--wait=false",
                            check=False)  # fmt: skip
        volumes = {p.name for p in node_cache.iterdir() if p.is_dir()}
        # A JuiceFS client keeps a volume's blocks under <cache dir>/<volume uuid>/.
        assert volumes == volumes_before, f"the rogue volume wrote into {node_cache}"
        print(f"the node cache still holds only volume(s) {sorted(volumes)}")
        victim_still_serves(cluster, tenants, model, "victim-after-rogue")
    finally:
        rogue.stop()
