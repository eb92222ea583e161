"""Tenants read, never write: the credentials every opted-in namespace gets, tried for real.

`stack.credentials()` is what devcluster puts in the credentials Secret (and
the namespace controller copies into each opted-in namespace): a Redis user
allowed only READER_COMMANDS and a MinIO user whose policy allows GET and
LIST under the volume's prefix. Each test uses exactly those against the
session's real MinIO, Redis and JuiceFS 1.4.2, and checks with the admin's
credentials afterwards that nothing in the volume changed.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster.s3 import S3Client
from devcluster.services import READER_COMMANDS, RedisReplyError, StorageError
from devcluster.storage import MIB, PATH_TEMPLATE, Credentials, StorageStack
from modelstore.manifest import MANIFEST_NAME, MODELS_DIR, Manifest, read_manifest, sha256_file
from modelstore.mount import JuiceFSMount
from modelstore.streamer import stream_model

BENTO, VERSION = "tenant-read", "v1"
# Refused at every read-only mount's start, harmlessly: JuiceFS asks for INFO
# and CLUSTER INFO, logs "parse info: NOPERM" and goes on (see READER_COMMANDS).
TOLERATED = {"info", "cluster|info"}

State = tuple[dict[str, int], dict[str, str], int]


@pytest.fixture(scope="module")
def model(stack: StorageStack, scratch: Path) -> Manifest:
    return stack.publish_random(scratch, BENTO, VERSION, [8 * MIB] * 2)


@pytest.fixture(scope="module")
def tenant(stack: StorageStack) -> Credentials:
    found = stack.tenant
    assert stack.credentials() == found.secret_data()
    return found


@pytest.fixture
def tenant_s3(stack: StorageStack, tenant: Credentials) -> Iterator[S3Client]:
    client = S3Client(stack.store.endpoint, tenant.access_key, tenant.secret_key)
    yield client
    client.close()


# Keys the writer's own mount keeps updating (its session's heartbeat, its
# clean-up timestamps, directory stats it flushes a moment after a publish).
WRITER_HOUSEKEEPING = re.compile(
    r"^(allSessions|sessionInfos|lastCleanup\w*|dir(DataLength|Used\w*))$"
)


def volume_state(stack: StorageStack) -> State:
    """What any write would change, read with the admin's credentials.

    Every object in the bucket (key -> size), every metadata key's value
    (dumped, so hashes and lists count) but the writer mount's housekeeping,
    and the number of keys.
    """
    db = stack.juicefs.db
    keys = sorted(
        k for k in stack.redis.command("KEYS", "*", db=db) if not WRITER_HOUSEKEEPING.match(k)
    )
    dumps = {key: str(stack.redis.command("DUMP", key, db=db)) for key in keys}
    return stack.store.s3.list_objects(stack.store.bucket), dumps, len(keys)


def tenant_redis(stack: StorageStack, *args: str) -> Any:
    """One command as the tenants' Redis user, in the volume's database."""
    redis = stack.redis
    return redis.command(
        *args, user=redis.reader_user, password=redis.reader_password, db=stack.juicefs.db
    )


def denied_commands(stack: StorageStack) -> dict[str, set[str]]:
    """Redis's ACL LOG: user -> the commands it was refused since the last reset."""
    found: dict[str, set[str]] = {}
    for entry in stack.redis.command("ACL", "LOG", "128"):
        fields = dict(zip(entry[::2], entry[1::2], strict=True))
        found.setdefault(fields["username"], set()).add(fields["object"])
    return found


def test_the_volume_holds_no_keys_and_the_secret_only_the_tenants(
    stack: StorageStack, tenant: Credentials, model: Manifest
) -> None:
    # Formatted without keys: a mount's .config and the metadata's `setting` (both
    # readable by any tenant) hold none, so each client uses its own.
    setting = json.loads(tenant_redis(stack, "GET", "setting"))
    assert not setting.get("AccessKey"), setting
    assert not setting.get("SecretKey"), setting
    writer = stack.writer
    secret = json.dumps(stack.credentials())
    for value in (writer.secret_key, stack.redis.password):
        assert value not in secret
        assert value not in json.dumps(setting)
    assert tenant.access_key != writer.access_key
    assert tenant.meta_url.startswith(f"redis://{stack.redis.reader_user}:")
    # No anonymous access to either.
    assert _anonymous(stack.redis.host, stack.redis.port, b"GET setting\r\n").startswith(b"-NOAUTH")
    uuid_object = f"/{stack.store.bucket}/{stack.volume_name}/juicefs_uuid"
    request = f"GET {uuid_object} HTTP/1.0\r\nHost: {stack.store.host}\r\n\r\n".encode()
    assert _anonymous(stack.store.host, stack.store.port, request).split(b" ")[1] == b"403"


def _anonymous(host: str, port: int, request: bytes) -> bytes:
    """The start of the answer to request, sent without any credentials."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(256)


def test_the_tenants_object_store_user_can_get_and_list_and_nothing_else(
    stack: StorageStack, model: Manifest, tenant_s3: S3Client
) -> None:
    bucket, prefix = stack.store.bucket, stack.volume_name
    keys = stack.block_keys(model, BENTO, VERSION)
    victim = keys[0]
    original = stack.store.s3.get_object(bucket, victim)
    stack.store.s3.put_object(bucket, "elsewhere/object", b"not the volume's")
    before = volume_state(stack)

    # Allowed: GET and LIST within the volume's prefix.
    assert tenant_s3.get_object(bucket, victim) == original
    listed = tenant_s3.list_objects(bucket, f"{prefix}/")
    assert set(keys) <= set(listed)

    batch = f"<Delete><Object><Key>{victim}</Key></Object></Delete>".encode()
    md5 = {"content-md5": base64.b64encode(hashlib.md5(batch).digest()).decode()}
    copy_block = {"x-amz-copy-source": f"/{bucket}/{keys[-1]}"}
    requests: dict[str, tuple[str, str, dict[str, str], bytes, dict[str, str]]] = {
        "PUT a new object": ("PUT", f"{prefix}/chunks/new", {}, b"x", {}),
        "PUT over a block": ("PUT", victim, {}, b"poisoned", {}),
        "PUT over juicefs_uuid": ("PUT", f"{prefix}/juicefs_uuid", {}, b"x", {}),
        "DELETE a block": ("DELETE", victim, {}, b"", {}),
        "CopyObject onto a block": ("PUT", victim, {}, b"", copy_block),
        "CopyObject to a new key": ("PUT", f"{prefix}/copy", {}, b"", copy_block),
        "multipart upload": ("POST", f"{prefix}/chunks/mpu", {"uploads": ""}, b"", {}),
        "DeleteObjects (batch)": ("POST", "", {"delete": ""}, batch, md5),
        "PUT bucket policy": ("PUT", "", {"policy": ""}, b'{"Version":"2012-10-17"}', {}),
        "DELETE the bucket": ("DELETE", "", {}, b"", {}),
        "GET outside the volume": ("GET", "elsewhere/object", {}, b"", {}),
        "LIST the whole bucket": ("GET", "", {"list-type": "2"}, b"", {}),
    }
    refused: dict[str, int] = {}
    for what, (method, key, query, payload, headers) in requests.items():
        path = f"/{bucket}/{key}" if key else f"/{bucket}"
        status, body = tenant_s3.request(method, path, query, payload, headers=headers)
        # A batch delete answers 200 with an error per key; everything else 403.
        assert status == (200 if what.startswith("DeleteObjects") else 403), f"{what}: {status}"
        assert b"<Code>AccessDenied</Code>" in body, f"{what}: {body[:300]!r}"
        assert b"<Deleted>" not in body, what
        refused[what] = status
    stack.store.s3.delete_object(bucket, "elsewhere/object")
    after = volume_state(stack)
    objects_before = {k: v for k, v in before[0].items() if not k.startswith("elsewhere/")}
    assert after[0] == objects_before
    assert stack.store.s3.get_object(bucket, victim) == original
    print(f"S3 as the tenant: GET and LIST allowed; {len(refused)} other requests AccessDenied:")
    for what, status in refused.items():
        print(f"  HTTP {status} AccessDenied  {what}")


def test_the_tenants_redis_user_reads_and_every_write_is_noperm(
    stack: StorageStack, model: Manifest
) -> None:
    before = volume_state(stack)
    assert tenant_redis(stack, "GET", "setting")  # reads work
    attempts: list[tuple[str, ...]] = [
        ("SET", "setting", "{}"),
        ("SET", "i1", "x"),
        ("DEL", "setting"),
        ("UNLINK", "i1"),
        ("RENAME", "d1", "d9"),
        ("HSET", "d1", "evil", "x"),
        ("HDEL", "d1", "bentos"),
        ("RPUSH", "c2_0", "x"),
        ("LTRIM", "c2_0", "0", "0"),
        ("INCRBY", "nextinode", "1"),
        ("ZADD", "allSessions", "1", "1"),
        ("EXPIRE", "setting", "1"),
        ("RESTORE", "x", "0", "x"),
        ("FLUSHDB",),
        ("FLUSHALL",),
        ("EVAL", "return redis.call('SET', 'setting', '{}')", "0"),
        ("SCRIPT", "LOAD", "return 1"),
        ("FUNCTION", "FLUSH"),
        ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
        ("ACL", "SETUSER", "jfs-reader", "+@all"),
        ("MULTI",),
        ("KEYS", "*"),
    ]
    refused: list[str] = []
    for args in attempts:
        with pytest.raises(RedisReplyError, match=r"^NOPERM") as excinfo:
            tenant_redis(stack, *args)
        refused.append(f"{' '.join(args[:2])}: {excinfo.value}")
    assert volume_state(stack) == before
    allowed = stack.redis.command("ACL", "GETUSER", stack.redis.reader_user)
    commands = dict(zip(allowed[::2], allowed[1::2], strict=True))["commands"]
    first, *granted = commands.split()
    assert first == "-@all", commands
    assert sorted(granted) == sorted(f"+{c}" for c in READER_COMMANDS), commands
    print(f"Redis as the tenant ({commands}): {len(refused)} commands refused with NOPERM:")
    for line in refused:
        print(f"  {line}")


def test_a_tenant_mount_cannot_write_and_juicefs_admin_commands_fail(
    stack: StorageStack, tenant: Credentials, model: Manifest, tmp_path: Path
) -> None:
    volume = stack.juicefs
    before = volume_state(stack)
    # Without --read-only JuiceFS needs a session (INCRBY, ZADD, HSET): refused, no mount.
    with pytest.raises(StorageError) as refused:
        volume.mount(tmp_path / "rw", tmp_path / "rw-cache", meta_url=tenant.meta_url,
                     env=tenant.env, timeout=30)  # fmt: skip
    assert "new session" in str(refused.value)
    assert "NOPERM" in str(refused.value)

    # The whole volume, read-only, as a tenant could mount it by hand (no --subdir).
    mnt = volume.mount(
        tmp_path / "ro",
        tmp_path / "ro-cache",
        meta_url=tenant.meta_url,
        env=tenant.env,
        extra_args=["--read-only", "--no-bgjob"],
    )
    try:
        config = (mnt / ".config").read_text()
        for secret in (stack.writer.secret_key, stack.writer.access_key, stack.redis.password):
            assert secret not in config  # no keys in the volume's format to read
        bento = mnt / PATH_TEMPLATE.format(name=BENTO, version=VERSION).lstrip("/")
        shard = model.files[-1]
        path = bento / MODELS_DIR / shard.path
        assert sha256_file(path) == shard.sha256  # reads work
        attempts: dict[str, Callable[[], object]] = {
            "create": lambda: (bento / "new-file").write_bytes(b"x"),
            "open for writing": lambda: path.open("r+b").close(),
            "truncate": lambda: os.truncate(path, 0),
            "unlink": lambda: path.unlink(),
            "unlink the manifest": lambda: (bento / MANIFEST_NAME).unlink(),
            "rename": lambda: path.rename(path.with_name("renamed")),
            "rename the Bento": lambda: bento.rename(bento.with_name("v2")),
            "mkdir": lambda: (bento / "new-dir").mkdir(),
            "rmdir": lambda: (bento / MODELS_DIR).rmdir(),
            "symlink": lambda: (bento / "link").symlink_to(path),
            "hard link": lambda: os.link(path, bento / "hard"),
            "chmod": lambda: path.chmod(0o777),
            "utime": lambda: os.utime(path, (0, 0)),
            "setxattr": lambda: os.setxattr(path, "user.x", b"1"),
        }
        refused_ops = []
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as excinfo:  # noqa: PT011 (checked below)
                attempt()
            # xattrs are off on a JuiceFS mount unless --enable-xattr: ENOTSUP first.
            allowed = {errno.EROFS, errno.ENOTSUP} if what == "setxattr" else {errno.EROFS}
            assert excinfo.value.errno in allowed, f"{what}: {excinfo.value}"
            refused_ops.append(what)

        def juicefs(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(volume.binary), "--no-agent", *args],
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
                env={**os.environ, **tenant.env},
            )

        admin = {
            "rmr": ["rmr", str(bento)],
            "config --trash-days": ["config", tenant.meta_url, "--trash-days", "5", "--yes"],
            "gc --delete": ["gc", tenant.meta_url, "--delete"],
            "gc --compact": ["gc", tenant.meta_url, "--compact"],
            "quota set": ["quota", "set", tenant.meta_url, "--path", "/bentos", "--inodes", "1"],
            "format --force": [
                "format",
                "--storage",
                "minio",
                "--bucket",
                stack.store.bucket_url,
                tenant.meta_url,
                stack.volume_name,
                "--force",
            ],
            "destroy": ["destroy", tenant.meta_url, _uuid(config), "--yes", "--force"],
        }
        failed = {}
        for what, args in admin.items():
            proc = juicefs(*args)
            output = proc.stdout + proc.stderr
            assert proc.returncode != 0, f"juicefs {what} succeeded:\n{output}"
            failed[what] = _reason(output)  # a refused write, not the INFO every client asks
        # Reading the model back: still the same bytes, with a warmup too.
        assert juicefs("warmup", str(bento / MODELS_DIR)).returncode == 0
        for entry in model.files:
            assert sha256_file(bento / MODELS_DIR / entry.path) == entry.sha256
    finally:
        volume.umount(mnt)
    assert volume_state(stack) == before
    print(f"tenant read-only mount: {len(refused_ops)} operations EROFS: {', '.join(refused_ops)}")
    print(f"juicefs as the tenant: {len(failed)} admin commands failed:")
    for what, reason in failed.items():
        print(f"  juicefs {what}: {reason}")


def test_the_sidecar_mounts_streams_verifies_and_fills_with_tenant_credentials_alone(
    stack: StorageStack, tenant: Credentials, model: Manifest, tmp_path: Path
) -> None:
    settings = stack.sidecar_settings(tmp_path, BENTO, VERSION)
    assert (settings.meta_url, settings.access_key, settings.secret_key) == (
        tenant.meta_url,
        tenant.access_key,
        tenant.secret_key,
    )
    before = volume_state(stack)
    stack.redis.command("ACL", "LOG", "RESET")

    async def scenario() -> int:
        mount = JuiceFSMount(settings.mount_spec())
        await mount.start()
        try:
            progress = await stream_model(
                settings.warmup_concurrency,
                mount,
                read_manifest(mount.bento_dir).select(settings.models),
                time.monotonic() + settings.warmup_timeout_seconds,
                on_progress=lambda p: None,
                on_error=lambda p, e: None,
                filler=mount,  # juicefs warmup completes the cache
            )
            await mount.evict_cache([mount.models_dir])  # the node agent's eviction
            return progress.done_bytes
        finally:
            await mount.stop()

    assert asyncio.run(scenario()) == model.total_bytes
    refused = denied_commands(stack).get(stack.redis.reader_user, set())
    assert refused <= TOLERATED, f"the read path needs more than READER_COMMANDS: {refused}"
    assert volume_state(stack) == before
    print(f"sidecar with tenant credentials: {model.total_bytes / MIB:.0f} MiB verified; "
          f"Redis refused only {sorted(refused)} (expected, harmless)")  # fmt: skip


def _uuid(config: str) -> str:
    return str(json.loads(config)["Format"]["UUID"])


def _reason(output: str) -> str:
    """The first line of juicefs's output that says a write was refused (else AssertionError)."""
    for marker in ("NOPERM", "StatusCode: 403", "read-only file system"):
        for line in output.splitlines():
            if marker in line and "parse info" not in line:
                return line.split(">: ", 1)[-1][:160]
    raise AssertionError(f"no refused write in juicefs's output:\n{output}")
