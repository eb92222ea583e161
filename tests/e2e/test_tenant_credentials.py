"""What a pod in an opted-in namespace receives can read the models and change nothing.

The platform team's Secret in bento-juicefs-system holds the tenants'
read-only credentials (devcluster keeps the publisher's on the host); the
namespace controller copies it into each opted-in namespace, and the
injected sidecar gets it as `secretKeyRef` env. A real pod on the local node
mounts, verifies and opens its gate with them; then the very credentials its
sidecar was given are tried for writes: from inside the sidecar (the FUSE
mount, a read-write `juicefs mount`, Redis) and from the host (S3).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest

from devcluster import Cluster
from devcluster.images import SAMPLE_BENTO_IMAGE
from devcluster.node import Node
from devcluster.s3 import S3Client
from devcluster.services import RedisReplyError
from devcluster.storage import MIB, StorageStack
from modelstore.manifest import Manifest
from tests.e2e.pods import (
    GATE,
    SIDECAR,
    condition,
    diagnose,
    exec_in,
    is_ready,
    opted_in_namespace,
    wait_pod,
)

SYSTEM = "bento-juicefs-system"
CREDENTIALS = "juicefs-models-credentials"
BENTO, VERSION = "tenant-e2e", "v1"
ENV_KEYS = {
    "JFS_META_URL": "metaurl",
    "JFS_ACCESS_KEY": "access-key",
    "JFS_SECRET_KEY": "secret-key",
}

# Run inside the sidecar with its own env: a Redis write as the pod's metadata user.
REDIS_WRITE = r"""
import os, socket, urllib.parse
url = urllib.parse.urlsplit(os.environ["JFS_META_URL"])
def req(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        out += b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode())
    return out
with socket.create_connection((url.hostname, url.port), timeout=10) as s:
    f = s.makefile("rb")
    for args in (("AUTH", url.username, url.password), ("SELECT", url.path.strip("/") or "0"),
                 ("SET", "setting", "{}"), ("DEL", "setting")):
        s.sendall(req(*args))
        said = " ".join(args[:2]) if args[0] != "AUTH" else "AUTH"
        print(said, "->", f.readline().decode().strip())
"""

# A read-write mount with the sidecar's own credentials (the keys where juicefs reads them).
RW_MOUNT = (
    'mkdir -p /tmp/rw && MINIO_ACCESS_KEY="$JFS_ACCESS_KEY" MINIO_SECRET_KEY="$JFS_SECRET_KEY" '
    'timeout 20 juicefs --no-agent mount --no-usage-report "$JFS_META_URL" /tmp/rw 2>&1; '
    'echo "exit=$?"; grep -c " /tmp/rw " /proc/mounts || true'
)


@pytest.fixture(scope="module")
def model(storage: StorageStack, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    # Published from the host with the publisher's credentials: never a tenant's.
    return storage.publish_random(tmp_path_factory.mktemp("tenant"), BENTO, VERSION, [8 * MIB] * 2)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    with opted_in_namespace(cluster, "e2e-tenant") as name:
        yield name


def secret_data(cluster: Cluster, namespace: str, name: str = CREDENTIALS) -> dict[str, str]:
    secret = cluster.get_json("secret", name, "-n", namespace)
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def pod_manifest(model: Manifest) -> dict[str, Any]:
    shard = max(model.files, key=lambda f: f.size)
    models = "/home/bentoml/bento/models"
    check = (
        f'test "$(sha256sum {models}/{shard.path} | cut -d" " -f1)" = {shard.sha256} '
        "&& echo verified && exec sleep 3600"
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "tenant",
            "labels": {
                "juicefs.bentoml.com/model-store": "juicefs",
                "yatai.ai/bento-repository": BENTO,
                "yatai.ai/bento-version": VERSION,
            },
            "annotations": {"juicefs.bentoml.com/cache-size": "1Gi"},
        },
        "spec": {
            "terminationGracePeriodSeconds": 10,
            "containers": [
                {
                    "name": "main",
                    "image": SAMPLE_BENTO_IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", check],
                }
            ],
        },
    }


def received(pod: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The Secret the sidecar's credential env comes from, and which env var has which key."""
    sidecar = next(c for c in pod["spec"]["initContainers"] if c["name"] == SIDECAR)
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in sidecar["env"]
        if "secretKeyRef" in (e.get("valueFrom") or {})
    }
    assert set(refs) == set(ENV_KEYS), refs
    names = {ref["name"] for ref in refs.values()}
    assert len(names) == 1, refs
    return names.pop(), {env: ref["key"] for env, ref in refs.items()}


def test_a_pods_credentials_are_the_read_only_ones_and_cannot_write(
    cluster: Cluster, node: Node, storage: StorageStack, model: Manifest, namespace: str
) -> None:
    # What the platform team's Secret holds: the tenants' credentials, not the publisher's.
    source = secret_data(cluster, SYSTEM)
    assert source == storage.credentials()
    writer = storage.writer
    for secret in (writer.secret_key, storage.redis.password):
        assert all(secret not in value for value in source.values())

    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod_manifest(model)))
    pod = wait_pod(cluster, namespace, "tenant", is_ready, timeout=180, what="pod tenant Ready")
    gate = condition(pod, GATE)
    assert gate is not None
    assert gate["status"] == "True", diagnose(cluster, namespace, "tenant")
    logs = cluster.kubectl("logs", "tenant", "-n", namespace, "-c", "main").stdout
    assert "verified" in logs

    # Exactly what the pod received: the Secret its sidecar's env references, in its namespace.
    name, keys = received(pod)
    assert name == CREDENTIALS
    given = secret_data(cluster, namespace, name)
    assert given == source
    assert given[keys["JFS_META_URL"]].startswith(f"redis://{storage.redis.reader_user}:")
    assert given[keys["JFS_ACCESS_KEY"]] != writer.access_key

    # Inside the sidecar, with its own env.
    mount_point = next(
        e["value"]
        for c in pod["spec"]["initContainers"]
        if c["name"] == SIDECAR
        for e in c["env"]
        if e["name"] == "JFS_MOUNT_POINT"
    )
    top = model.files[0].path.split("/")[0]  # a model's directory, e.g. llm
    for write in (
        f"echo x > {mount_point}/evil",
        f"rm -rf {mount_point}/{top}",
        f"mv {mount_point}/{top} {mount_point}/moved",
        f"mkdir {mount_point}/new",
    ):
        code, out = exec_in(cluster, namespace, "tenant", SIDECAR, "sh", "-c", write)
        assert code != 0, f"{write}: {out}"
        assert "Read-only file system" in out, f"{write}: {out}"
    code, out = exec_in(cluster, namespace, "tenant", SIDECAR, "sh", "-c", RW_MOUNT)
    assert "NOPERM" in out, out
    assert out.strip().endswith("0"), f"a read-write mount is up:\n{out}"  # none in /proc/mounts
    code, out = exec_in(cluster, namespace, "tenant", SIDECAR, "python", "-c", REDIS_WRITE)
    assert code == 0, out
    assert "AUTH -> +OK" in out, out
    assert out.count("-NOPERM") == 2, out  # SET and DEL
    print(f"inside the sidecar:\n{out.strip()}")

    # From the host, the same credentials against MinIO: read yes, write no.
    s3 = S3Client(storage.store.endpoint, given["access-key"], given["secret-key"])
    bucket = storage.store.bucket
    block = storage.block_keys(model, BENTO, VERSION)[0]
    try:
        original = s3.get_object(bucket, block)
        copy = {"x-amz-copy-source": f"/{bucket}/{block}"}
        for what, (method, key, payload, headers) in {
            "PUT": ("PUT", block, b"poisoned", {}),
            "DELETE": ("DELETE", block, b"", {}),
            "CopyObject": ("PUT", f"{storage.volume_name}/copied", b"", copy),
        }.items():
            status, body = s3.request(method, f"/{bucket}/{key}", payload=payload, headers=headers)
            assert status == 403, f"{what}: HTTP {status} {body[:200]!r}"
            assert b"AccessDenied" in body, what
    finally:
        s3.close()
    assert storage.store.s3.get_object(bucket, block) == original
    user, password = storage.redis.reader_user, storage.redis.reader_password
    for args in (("SET", "setting", "{}"), ("DEL", "setting")):
        with pytest.raises(RedisReplyError, match=r"^NOPERM"):
            storage.redis.command(*args, user=user, password=password, db=storage.juicefs.db)
    assert storage.redis.command("GET", "setting", db=storage.juicefs.db)  # still there
