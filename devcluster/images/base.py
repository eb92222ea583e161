"""The local base image: a Debian rootfs from mmdebstrap, imported into buildah.

Built from the Debian mirror apt uses on this machine, with a fixed
SOURCE_DATE_EPOCH (the tar is byte-identical between runs of the same package
versions), and with /etc/hosts, /etc/resolv.conf and /etc/hostname of its own
(mmdebstrap would copy the host's resolv.conf and hostname and write no hosts).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from devcluster.images.steps import Buildah, Layout, inputs_key, oci_arch, run, say, step

SUITE = "bookworm"
BASE_PACKAGES: tuple[str, ...] = ("python3", "python3-venv", "fuse3", "ca-certificates")
BASE_REPOSITORY = "localhost/bento-juicefs-base"
SOURCE_DATE_EPOCH = 1735689600  # 2025-01-01T00:00:00Z
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_DIR = Path("/etc/apt")

# $1 is the rootfs. Neutral files: the runtime bind-mounts its own over them.
CUSTOMIZE_HOOK = "; ".join(
    (
        'rm -f "$1/etc/hosts" "$1/etc/resolv.conf" "$1/etc/hostname"',
        "printf '127.0.0.1\\tlocalhost\\n::1\\tlocalhost ip6-localhost ip6-loopback\\n'"
        ' > "$1/etc/hosts"',
        "printf '# written by the container runtime\\n' > \"$1/etc/resolv.conf\"",
        "printf 'localhost\\n' > \"$1/etc/hostname\"",
        'chmod 0644 "$1/etc/hosts" "$1/etc/resolv.conf" "$1/etc/hostname"',
    )
)
# Docs, man pages and translations are not needed in an image (copyrights stay).
DPKG_OPTIONS: tuple[str, ...] = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
_SUITE_RE = re.compile(rf"^{SUITE}(-updates|-security)?$")


def _one_line_sources(text: str) -> list[str]:
    lines = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        words = line.split()
        rest = words[1:]
        options = ""
        if rest and rest[0].startswith("["):
            end = next(i for i, w in enumerate(rest) if w.endswith("]"))
            options = " ".join(rest[: end + 1]) + " "
            rest = rest[end + 1 :]
        if len(rest) >= 3 and _SUITE_RE.match(rest[1]):
            lines.append(f"deb {options}{rest[0]} {rest[1]} {' '.join(rest[2:])}")
    return lines


def _deb822_sources(text: str) -> list[str]:
    lines = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for raw in stanza.splitlines():
            if raw.startswith("#") or ":" not in raw:
                continue
            key, _, value = raw.partition(":")
            fields[key.strip().lower()] = value.strip()
        if (
            fields.get("enabled", "yes").lower() == "no"
            or "deb" not in fields.get("types", "").split()
        ):
            continue
        options = f"[signed-by={fields['signed-by']}] " if "signed-by" in fields else ""
        components = fields.get("components", "main")
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                if _SUITE_RE.match(suite):
                    lines.append(f"deb {options}{uri} {suite} {components}")
    return lines


def apt_sources(apt_dir: Path = APT_DIR) -> list[str]:
    """The host's enabled Debian sources for SUITE (and -updates, -security), one-line form."""
    found: list[str] = []
    candidates = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.name.endswith(".list"):
            found += _one_line_sources(text)
        elif path.name.endswith(".sources"):
            found += _deb822_sources(text)
    return list(dict.fromkeys(found)) or [f"deb {DEFAULT_MIRROR} {SUITE} main"]


def base_key(sources: list[str]) -> str:
    return inputs_key(
        texts=[
            "mmdebstrap --variant=minbase",
            SUITE,
            *BASE_PACKAGES,
            *sources,
            CUSTOMIZE_HOOK,
            *DPKG_OPTIONS,
            str(SOURCE_DATE_EPOCH),
        ]
    )


def base_image_name(key: str) -> str:
    return f"{BASE_REPOSITORY}:{SUITE}-{key}"


@contextmanager
def from_scratch(buildah: Buildah, name: str, log: Path, config: Sequence[str]) -> Iterator[str]:
    """A buildah container from scratch, to put files in; on leaving, configured
    (config, then linux on this machine's arch), committed as name at
    SOURCE_DATE_EPOCH, and removed (removed also when putting files in fails)."""
    container = buildah.run("from", "scratch", log=log, what="buildah from", capture=True)
    container = container.strip()
    try:
        yield container
        buildah.run(
            "config",
            *config,
            "--os",
            "linux",
            "--arch",
            oci_arch(),
            container,
            log=log,
            what="buildah config",
        )
        buildah.run(
            "commit",
            "--timestamp",
            str(SOURCE_DATE_EPOCH),
            container,
            name,
            log=log,
            what="buildah commit",
        )
    finally:
        buildah.run("rm", container, log=log, what="buildah rm")


def ensure_base(layout: Layout, buildah: Buildah, mmdebstrap: Path, sources: list[str]) -> str:
    """The local base image's name, building the rootfs and importing it if needed."""
    key = base_key(sources)
    name = base_image_name(key)
    if buildah.has_image(name):
        say(f"base image {name}: cached")
        return name
    rootfs = layout.base / f"rootfs-{SUITE}-{key}.tar"
    log = layout.logs / "base.log"
    if rootfs.is_file():
        say(f"base rootfs {rootfs.name}: cached")
    else:
        partial = rootfs.with_suffix(".partial.tar")
        partial.unlink(missing_ok=True)
        with step(f"base rootfs: mmdebstrap {SUITE} {','.join(BASE_PACKAGES)}"):
            run(
                [
                    mmdebstrap,
                    "--variant=minbase",
                    "--include=" + ",".join(BASE_PACKAGES),
                    "--format=tar",
                    *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
                    f"--customize-hook={CUSTOMIZE_HOOK}",
                    SUITE,
                    partial,
                    *sources,
                ],
                log,
                what="mmdebstrap",
                env={"SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)},  # apt's _apt sandbox needs /tmp
            )
            os.replace(partial, rootfs)
    config = [
        "--env",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--cmd",
        '["/bin/sh"]',
    ]
    with (
        step(f"base image: import {rootfs.name} as {name}"),
        from_scratch(buildah, name, log, config) as container,
    ):
        buildah.run("add", container, rootfs, "/", log=log, what="buildah add")
    return name
