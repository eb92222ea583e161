"""Volumes per namespace, below Kubernetes: one volume's tenants read nothing of another's.

Two volumes as a platform would give two tenants: `models` (the session's
stack) and `team-b`, in the same MinIO bucket (each under its own prefix)
with a metadata engine each. Each volume's tenants get their own MinIO user
(GET/LIST of their prefix only) and their own Redis reader; the namespace
controller hands a namespace only its volumes' Secrets (tests/e2e/
test_tenant_volumes.py). Here, with the real MinIO, Redis and JuiceFS 1.4.2:
one tenant's credentials neither GET nor LIST the other's blocks, do not log
in to the other's metadata engine, and do not read the other's files even
with the other's metadata URL in hand.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.storage.redis import RedisReplyError
from devcluster.storage.s3 import S3Client, S3Error
from devcluster.storage.service import StorageError
from devcluster.storage.stack import MIB, PATH_TEMPLATE, Credentials, StorageStack
from modelstore.manifest import MODELS_DIR, Manifest, sha256_file

BENTO, VERSION = "tenant-volumes", "v1"


@pytest.fixture(scope="module")
def team_b(stack: StorageStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageStack]:
    """A second volume in the session's MinIO bucket, with a metadata engine of its own."""
    with StorageStack(tmp_path_factory.mktemp("team-b"), "team-b", store=stack.store) as other:
        yield other


@pytest.fixture(scope="module")
def models(stack: StorageStack, team_b: StorageStack, scratch: Path) -> dict[str, Manifest]:
    return {
        stack.volume_name: stack.publish_random(scratch, BENTO, VERSION, [4 * MIB]),
        team_b.volume_name: team_b.publish_random(scratch, BENTO, VERSION, [4 * MIB]),
    }


def _s3(stack: StorageStack, keys: Credentials) -> S3Client:
    return S3Client(stack.store.endpoint, keys.access_key, keys.secret_key)


def test_each_volume_has_its_own_tenant_users(stack: StorageStack, team_b: StorageStack) -> None:
    assert stack.tenant.access_key != team_b.tenant.access_key
    assert stack.redis.reader_user != team_b.redis.reader_user
    assert stack.redis.port != team_b.redis.port


def test_a_tenant_gets_and_lists_its_own_blocks_and_not_another_volume_s(
    stack: StorageStack, team_b: StorageStack, models: dict[str, Manifest]
) -> None:
    bucket = stack.store.bucket
    own = stack.block_keys(models[stack.volume_name], BENTO, VERSION)
    theirs = team_b.block_keys(models[team_b.volume_name], BENTO, VERSION)
    assert own
    assert theirs
    assert all(key.startswith(f"{team_b.volume_name}/") for key in theirs)
    for reader, mine, other in ((stack, own, theirs), (team_b, theirs, own)):
        client = _s3(stack, reader.tenant)
        try:
            assert client.get_object(bucket, mine[0])  # its own: readable
            assert client.list_objects(bucket, f"{reader.volume_name}/")
            for key in other[:3]:
                with pytest.raises(S3Error) as refused:
                    client.get_object(bucket, key)
                assert refused.value.status == 403, refused.value
            other_prefix = other[0].split("/", 1)[0] + "/"
            with pytest.raises(S3Error) as listing:
                client.list_objects(bucket, other_prefix)
            assert listing.value.status == 403, listing.value
        finally:
            client.close()


def test_a_tenant_cannot_log_in_to_another_volume_s_metadata_engine(
    stack: StorageStack, team_b: StorageStack, models: dict[str, Manifest]
) -> None:
    theirs = team_b.redis
    # Its own reader reads its own volume's format.
    assert theirs.command(
        "GET", "setting", user=theirs.reader_user, password=theirs.reader_password, db=1
    )
    mine = stack.redis
    with pytest.raises(RedisReplyError, match=r"^WRONGPASS"):
        theirs.command("GET", "setting", user=mine.reader_user, password=mine.reader_password, db=1)


def _with_user(meta_url: str, user: str, password: str) -> str:
    parts = urllib.parse.urlsplit(meta_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    credentials = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{credentials}@{host}"))


def test_another_volume_is_unreadable_with_one_s_own_credentials(
    stack: StorageStack, team_b: StorageStack, models: dict[str, Manifest], tmp_path: Path
) -> None:
    """A mount of team-b's volume as the models tenant: its Redis user cannot log in; and
    with team-b's metadata URL leaked to it, its S3 keys still read none of team-b's bytes."""
    mine = stack.tenant
    theirs = team_b.tenant
    volume = team_b.juicefs
    impostor = _with_user(theirs.meta_url, stack.redis.reader_user, stack.redis.reader_password)
    read_only = ["--read-only", "--no-bgjob", "--io-retries", "1"]
    with pytest.raises(StorageError) as refused:
        volume.mount(tmp_path / "a", tmp_path / "a-cache", meta_url=impostor, env=mine.env,
                     extra_args=read_only, timeout=30)  # fmt: skip
    assert "WRONGPASS" in str(refused.value) or "NOAUTH" in str(refused.value), refused.value

    mnt = volume.mount(
        tmp_path / "b",
        tmp_path / "b-cache",
        meta_url=theirs.meta_url,
        env=mine.env,
        extra_args=read_only,
    )
    try:
        shard = models[team_b.volume_name].files[-1]
        path = mnt / PATH_TEMPLATE.format(name=BENTO, version=VERSION).lstrip("/")
        with pytest.raises(OSError):  # noqa: PT011 (EIO: every GET is refused)
            sha256_file(path / MODELS_DIR / shard.path)
    finally:
        volume.umount(mnt)
