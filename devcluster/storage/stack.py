"""Real storage for tests, benchmarks and the demo: MinIO + Redis + a JuiceFS volume.

    with StorageStack(tmp / "storage") as stack:          # host="10.0.0.1" for pods on a node
        manifest = stack.publish_random(tmp, "llm", "v1", [64 << 20] * 4)
        settings = stack.sidecar_settings(tmp / "pod", "llm", "v1")
        stack.block_keys(manifest, "llm", "v1")           # the model's objects in the bucket
        stack.credentials()                               # the tenants' Secret: read-only

Two sets of credentials, as a platform would hand them out: the publisher's
(`stack.writer`: Redis's admin user, MinIO's root keys), used only here on
the host by the writer mount (`publish_random`, `bento_dir`); and the
tenants' (`stack.tenant`: a Redis user that can only read, a MinIO user
whose policy allows GET/LIST under the volume's prefix only), which is what
the credentials Secret holds, what `sidecar_settings` mounts with, and all a
pod or the node agent ever gets. The volume is formatted without keys, so
each client's own keys are the ones used.

The pieces are in their own modules: `devcluster.storage.s3` (S3 client, raw GET
benchmark), `devcluster.storage.service` (MinIO, Redis), `devcluster.storage.juicefs` (the
volume, `juicefs info`, cache contents), `devcluster.storage.throttle` (a slow disk).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from devcluster.lifecycle import StartStop
from devcluster.storage.juicefs import JuiceFSVolume, keys_env
from devcluster.storage.minio import ObjectStore
from devcluster.storage.redis import Redis
from devcluster.storage.service import LOOPBACK, storage_binaries
from modelstore.manifest import MODELS_DIR, Manifest
from modelstore.publish import bento_dir, publish
from sidecar.env import Settings

MIB = 1 << 20
PATH_TEMPLATE = "/bentos/{name}/{version}"  # the injector's default models.juicefsPathTemplate


def tenant_keys(volume: str) -> tuple[str, str]:
    """The MinIO keys of the volume's tenants (read-only policy on the volume's prefix).

    One user per volume, so that one volume's tenants read nothing of another
    volume in the same bucket. Fixed development values.
    """
    return f"bento-juicefs-{volume}-reader", f"bento-juicefs-{volume}-reader-secret-key"


def redis_reader(volume: str) -> tuple[str, str]:
    """The Redis user (and password) of the volume's tenants: one per volume, so that a
    volume's reader cannot log in to another volume's metadata engine."""
    return f"jfs-{volume}-reader", f"bento-juicefs-redis-{volume}-reader"


_URL_PASSWORD = re.compile(r"(//[^:/@]*:)[^@]*@")


def redacted(url: str) -> str:
    """A URL with its password replaced by ****."""
    return _URL_PASSWORD.sub(r"\1****@", url)


@dataclass(frozen=True)
class Credentials:
    """A metadata URL and object-store keys: one credentials Secret's worth."""

    meta_url: str
    access_key: str
    secret_key: str

    def secret_data(self) -> dict[str, str]:
        """The Secret's data under the injector's default keys (juicefs.*Key)."""
        return {
            "metaurl": self.meta_url,
            "access-key": self.access_key,
            "secret-key": self.secret_key,
        }

    @property
    def env(self) -> dict[str, str]:
        """The keys where `juicefs` reads them (the volume stores none)."""
        return keys_env(self.access_key, self.secret_key)


class StorageStack(StartStop):
    """MinIO + Redis + a formatted JuiceFS volume + a writer mount, under one work dir.

    `host` is the address MinIO and Redis listen on and advertise in the
    endpoint and metadata URLs (Redis listens on loopback too). `store`, when
    given, is the MinIO to use instead (e.g. one behind a shaped link).
    """

    def __init__(
        self,
        work_dir: Path,
        volume_name: str = "models",
        *,
        host: str = LOOPBACK,
        store: ObjectStore | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.logs = self.work_dir / "logs"
        self.host = host
        # A store passed in is shared (another volume's, or one behind a shaped
        # link): its owner stops it.
        self._owns_store = store is None
        self.store = store or ObjectStore(self.work_dir / "minio-data", self.logs, host=host)
        # Each volume its own metadata engine: Redis ACLs cannot fence one
        # volume's keys from another's (JuiceFS keys carry no volume prefix).
        self.redis = Redis(self.logs, host=host, reader=redis_reader(volume_name))
        self.volume_name = volume_name
        self.volume: JuiceFSVolume | None = None
        self.writer_mount = self.work_dir / "writer"

    def start(self) -> Self:
        binaries = storage_binaries()
        self.store.binary = binaries["minio"]
        self.store.mc_binary = binaries["mc"]
        try:
            self.redis.start()
            self.store.start()
            # The volume's objects are all under <volume name>/ in the bucket.
            self.store.grant_read(*tenant_keys(self.volume_name), self.volume_name)
            self.volume = JuiceFSVolume(
                self.volume_name, self.store, self.redis, self.logs, binary=binaries["juicefs"]
            )
            self.volume.format()  # without keys
            self.volume.mount(self.writer_mount, self.work_dir / "writer-cache")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def juicefs(self) -> JuiceFSVolume:
        if self.volume is None:
            raise RuntimeError("storage stack not started")
        return self.volume

    @property
    def writer(self) -> Credentials:
        """The publisher's credentials (read-write): never in a Secret a tenant can read."""
        return Credentials(self.juicefs.meta_url, self.store.access_key, self.store.secret_key)

    @property
    def tenant(self) -> Credentials:
        """The tenants' credentials: they can read the volume and change nothing in it."""
        return Credentials(self.juicefs.reader_meta_url, *tenant_keys(self.volume_name))

    def credentials(self) -> dict[str, str]:
        """The JuiceFS credentials Secret's data, as the platform team would write it: read-only."""
        return self.tenant.secret_data()

    def describe(self) -> dict[str, str]:
        return {
            "s3": self.store.bucket_url,
            "meta": redacted(self.juicefs.meta_url),
            "tenant meta": redacted(self.tenant.meta_url),
            "volume": self.volume_name,
            "logs": str(self.logs),
        }

    def stop(self) -> None:
        if self.volume is not None:
            self.volume.umount()
        if self._owns_store:
            self.store.stop()
        self.redis.stop()

    def bento_dir(self, name: str, version: str) -> Path:
        """A published Bento's directory on the writer mount."""
        return bento_dir(self.writer_mount, PATH_TEMPLATE, name, version)

    def publish_random(
        self, scratch: Path, name: str, version: str, shards: Sequence[int]
    ) -> Manifest:
        """Random shards written under scratch, then published through the writer mount."""
        source = scratch / f"src-{name}-{version}"
        try:
            models = write_random_model(source, shards)
            return publish(models, self.writer_mount, PATH_TEMPLATE, name, version)
        finally:
            shutil.rmtree(source, ignore_errors=True)

    def block_keys(self, manifest: Manifest, name: str, version: str) -> list[str]:
        """The objects holding a published model's blocks, file by file in load order."""
        models = self.bento_dir(name, version) / MODELS_DIR
        return [key for f in manifest.files for key in self.juicefs.object_keys(models / f.path)]

    def sidecar_settings(self, work: Path, name: str, version: str) -> Settings:
        """The sidecar's settings as the injector's defaults make them, its paths under work.

        With the tenants' read-only credentials, as a pod gets them.
        """
        tenant = self.tenant
        return Settings(
            pod_name="storage-stack",
            pod_namespace="storage-stack",
            pod_uid="",
            meta_url=tenant.meta_url,
            access_key=tenant.access_key,
            secret_key=tenant.secret_key,
            bento_name=name,
            bento_version=version,
            bento_path=PATH_TEMPLATE.format(name=name, version=version),
            models=(),
            mount_point=work / "mnt",
            private_mount=work / "volume",
            cache_dir=work / "cache",
            cache_size_mib=4096,
            buffer_size_mib=1024,
            prefetch=3,
            ssd_policy="off",
            warmup=True,
            warmup_timeout_seconds=600,
            warmup_concurrency=8,
            condition_type="juicefs.bentoml.com/models-ready",
            cache_min_mbps=0,
            juicefs_bin=str(self.juicefs.binary),
        )


def bentoml_model_yaml(
    name: str, version: str, *, creation_time: str = "2025-01-01T00:00:00+00:00"
) -> str:
    """A model.yaml that BentoML 1.4 accepts in a Bento's model store.

    `bentoml serve` of a Bento lists `<bento>/models/<model>/<version>/model.yaml`
    and refuses to start on one that lacks any of these keys.
    """
    return (
        f"name: {name}\n"
        f"version: {version}\n"
        "module: ''\n"
        "labels: {}\n"
        "options: {}\n"
        "metadata: {}\n"
        "context:\n"
        "  framework_name: ''\n"
        "  framework_versions: {}\n"
        "  bentoml_version: 1.4.40\n"
        "  python_version: 3.11.2\n"
        "signatures: {}\n"
        "api_version: v1\n"
        f"creation_time: '{creation_time}'\n"
    )


def write_random_model(
    root: Path, shards: Sequence[int], model: str = "llm", version: str = "v1"
) -> Path:
    """A BentoML models/ dir: small metadata files plus random-byte shards of the given sizes."""
    base = root / "models" / model / version
    base.mkdir(parents=True, exist_ok=True)
    (base / "model.yaml").write_text(bentoml_model_yaml(model, version))
    (base / "config.json").write_text(json.dumps({"shards": len(shards)}))
    (base / "tokenizer.json").write_bytes(os.urandom(200_000))
    (root / "models" / model / "latest").write_text(version)
    for i, size in enumerate(shards, 1):
        with (base / f"model-{i:05d}-of-{len(shards):05d}.safetensors").open("wb") as handle:
            left = size
            while left > 0:
                piece = min(left, 16 * MIB)
                handle.write(os.urandom(piece))
                left -= piece
    return root / "models"
