"""The contract between the injector and the sidecar: environment variable names.

The injector writes these into the sidecar container; the sidecar reads
nothing else. Both sides import the names from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

POD_NAME = "POD_NAME"
POD_NAMESPACE = "POD_NAMESPACE"
POD_UID = "POD_UID"
NODE_NAME = "NODE_NAME"
META_URL = "JFS_META_URL"
ACCESS_KEY = "JFS_ACCESS_KEY"
SECRET_KEY = "JFS_SECRET_KEY"
BENTO_NAME = "BENTO_NAME"
BENTO_VERSION = "BENTO_VERSION"
VOLUME = "JFS_VOLUME"
BENTO_PATH = "JFS_BENTO_PATH"
MODELS = "JFS_MODELS"
MOUNT_POINT = "JFS_MOUNT_POINT"
CACHE_DIR = "JFS_CACHE_DIR"
CACHE_SIZE_MIB = "JFS_CACHE_SIZE_MIB"
BUFFER_SIZE_MIB = "JFS_BUFFER_SIZE_MIB"
PREFETCH = "JFS_PREFETCH"
SSD_POLICY = "JFS_SSD_POLICY"
WARMUP = "JFS_WARMUP"
WARMUP_TIMEOUT_SECONDS = "JFS_WARMUP_TIMEOUT_SECONDS"
WARMUP_CONCURRENCY = "JFS_WARMUP_CONCURRENCY"
CONDITION_TYPE = "JFS_CONDITION_TYPE"
CACHE_MIN_MBPS = "JFS_CACHE_MIN_MBPS"
# Not set by the injector: defaults suit a container; the kubelet stand-in
# used in tests points them somewhere else on the host.
PRIVATE_MOUNT = "JFS_PRIVATE_MOUNT"
JUICEFS_BIN = "JFS_JUICEFS_BIN"
TOKEN_DIR = "JFS_TOKEN_DIR"

DEFAULT_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class SettingsError(ValueError):
    """The sidecar's environment is incomplete or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    pod_name: str
    pod_namespace: str
    pod_uid: str
    meta_url: str
    access_key: str | None
    secret_key: str | None
    bento_name: str
    bento_version: str
    bento_path: str
    models: tuple[str, ...]
    mount_point: Path
    private_mount: Path
    cache_dir: Path
    cache_size_mib: int
    buffer_size_mib: int
    prefetch: int
    ssd_policy: str
    warmup: bool
    warmup_timeout_seconds: int
    warmup_concurrency: int
    condition_type: str
    cache_min_mbps: float
    juicefs_bin: str
    token_dir: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        source = os.environ if env is None else env

        def need(name: str) -> str:
            value = source.get(name, "")
            if not value:
                raise SettingsError(f"environment variable {name} is not set")
            return value

        def number(name: str, default: str) -> int:
            raw = source.get(name, default)
            try:
                return int(raw)
            except ValueError:
                raise SettingsError(f"{name}={raw!r} is not a whole number") from None

        models = tuple(m for m in source.get(MODELS, "").split(",") if m)
        try:
            min_mbps = float(source.get(CACHE_MIN_MBPS, "200"))
        except ValueError:
            raise SettingsError(f"{CACHE_MIN_MBPS} is not a number") from None
        return cls(
            pod_name=need(POD_NAME),
            pod_namespace=need(POD_NAMESPACE),
            pod_uid=source.get(POD_UID, ""),
            meta_url=need(META_URL),
            access_key=source.get(ACCESS_KEY) or None,
            secret_key=source.get(SECRET_KEY) or None,
            bento_name=need(BENTO_NAME),
            bento_version=need(BENTO_VERSION),
            bento_path=need(BENTO_PATH),
            models=models,
            mount_point=Path(need(MOUNT_POINT)),
            private_mount=Path(source.get(PRIVATE_MOUNT, "/var/lib/juicefs/volume")),
            cache_dir=Path(need(CACHE_DIR)),
            cache_size_mib=number(CACHE_SIZE_MIB, "1024"),
            buffer_size_mib=number(BUFFER_SIZE_MIB, "300"),
            prefetch=number(PREFETCH, "1"),
            ssd_policy=source.get(SSD_POLICY, "required"),
            warmup=source.get(WARMUP, "true").lower() == "true",
            warmup_timeout_seconds=number(WARMUP_TIMEOUT_SECONDS, "3600"),
            warmup_concurrency=max(1, number(WARMUP_CONCURRENCY, "8")),
            condition_type=need(CONDITION_TYPE),
            cache_min_mbps=min_mbps,
            juicefs_bin=source.get(JUICEFS_BIN, "juicefs"),
            token_dir=Path(source.get(TOKEN_DIR, DEFAULT_TOKEN_DIR)),
        )
