"""Real storage for the sidecar's tests: MinIO + Redis + a JuiceFS volume with a FUSE mount.

Session-scoped (started once, about 2 s); models are published once per
session through the writer mount with `modelstore.publish`. Skips with a reason
when this machine cannot do real FUSE mounts or has no way to get Redis.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.storage import MIB, StorageStack
from modelstore.manifest import Manifest
from tests.helpers import storage_stack

BIG_SHARDS = [256 * MIB] * 4  # + ~0.2 MB of metadata files: just over 1 GiB
OUTAGE_SHARDS = [64 * MIB] * 4
SMALL_SHARDS = [8 * MIB] * 3


def _require_fuse() -> None:
    if os.geteuid() != 0:
        pytest.skip("real FUSE mounts (JuiceFS) need root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: no real FUSE mounts on this machine")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageStack]:
    _require_fuse()
    with storage_stack(tmp_path_factory.mktemp("storage")) as started:
        print(f"storage stack: {started.describe()}")
        yield started


@pytest.fixture(scope="session")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scratch")


@pytest.fixture(scope="session")
def big_model(stack: StorageStack, scratch: Path) -> Manifest:
    return stack.publish_random(scratch, "llm-big", "v1", BIG_SHARDS)


@pytest.fixture(scope="session")
def outage_model(stack: StorageStack, scratch: Path) -> Manifest:
    return stack.publish_random(scratch, "llm-outage", "v1", OUTAGE_SHARDS)


@pytest.fixture
def store_back(stack: StorageStack) -> Iterator[None]:
    """Whatever a fault test did, MinIO runs again afterwards."""
    yield
    if not stack.store.running:
        stack.store.start()


@pytest.fixture(autouse=True)
def _drop_cache_dir(tmp_path: Path) -> Iterator[None]:
    """The sidecar caches under tmp_path/cache are hundreds of MiB: not kept after a test."""
    yield
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
