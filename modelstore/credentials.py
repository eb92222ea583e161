"""A volume's credentials as `juicefs mount` takes them: never on its command line."""

from __future__ import annotations

import urllib.parse

from modelstore.mountspec import MountSpec


def split_meta_password(meta_url: str) -> tuple[str, str | None]:
    """The metadata URL without its password, and the password (None if it has none).

    juicefs takes the password from META_PASSWORD when the URL has none, so
    it never appears on a command line (/proc/<pid>/cmdline, `ps`) that any
    process of the pod can read.
    """
    parts = urllib.parse.urlsplit(meta_url)
    if parts.password is None:
        return meta_url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    netloc = f"{user}@{hostport}" if user else hostport
    bare = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return bare, urllib.parse.unquote(parts.password)


def credentials_env(spec: MountSpec) -> dict[str, str]:
    """The credentials for `juicefs mount`, in the variables 1.x reads.

    The metadata engine's password goes in META_PASSWORD (see
    split_meta_password).

    `juicefs mount` takes no keys itself: the keys stored by `juicefs format`
    win, and only when it stored none does the storage client read them from
    its SDK's environment (MINIO_* for `--storage minio`, the AWS chain for
    s3 and most S3-compatible stores). So per-tenant read-only keys need a
    volume formatted without keys.
    """
    env: dict[str, str] = {}
    _, password = split_meta_password(spec.meta_url)
    if password is not None:
        env["META_PASSWORD"] = password
    if spec.access_key:
        env["MINIO_ACCESS_KEY"] = env["AWS_ACCESS_KEY_ID"] = spec.access_key
    if spec.secret_key:
        env["MINIO_SECRET_KEY"] = env["AWS_SECRET_ACCESS_KEY"] = spec.secret_key
    return env
