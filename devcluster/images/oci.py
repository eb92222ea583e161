"""OCI archives: export from buildah into the cache, import into containerd.

An archive is `archives/<image slug>-<inputs key>.oci.tar` with a JSON note
beside it (name, digest, key); both present means "built and exported".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
import time
from collections.abc import Sequence
from hashlib import sha256
from pathlib import Path
from typing import Any

from devcluster.images.steps import Buildah, ImageArchive, ImagesError, Layout, say, step

NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace, where the kubelet looks
SNAPSHOTTER = "overlayfs"  # containerd's default, the kubelet's too
CTR_TIMEOUT_S = 300.0


def archive_path(layout: Layout, name: str, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return layout.archives / f"{slug}-{key}.oci.tar"


def cached_archive(layout: Layout, name: str, key: str) -> ImageArchive | None:
    """The archive exported earlier for exactly these inputs, if it is there."""
    path = archive_path(layout, name, key)
    note = path.with_suffix(".json")
    try:
        meta = json.loads(note.read_text())
    except (OSError, ValueError):
        return None
    if not path.is_file() or meta.get("name") != name or meta.get("key") != key:
        return None
    return ImageArchive(name=name, path=path, digest=str(meta["digest"]))


def _read_json(path: Path, tar: tarfile.TarFile, member: str) -> dict[str, Any]:
    try:
        handle = tar.extractfile(member)
    except KeyError:
        handle = None
    if handle is None:
        raise ImagesError(f"{path}: no {member}")
    data: dict[str, Any] = json.load(handle)
    return data


def _blob(digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    return f"blobs/{algorithm}/{hexdigest}"


def archive_digest(path: Path) -> str:
    """The manifest digest an OCI archive's index.json points at (what containerd records)."""
    with tarfile.open(path) as tar:
        manifests = _read_json(path, tar, "index.json").get("manifests") or []
    if len(manifests) != 1:
        raise ImagesError(f"{path}: expected one manifest in index.json, found {len(manifests)}")
    return str(manifests[0]["digest"])


def archive_layers(path: Path) -> list[str]:
    """The archive members of the image's layers, bottom first."""
    with tarfile.open(path) as tar:
        manifest = _read_json(path, tar, _blob(archive_digest(path)))
    return [_blob(layer["digest"]) for layer in manifest["layers"]]


def archive_chain_id(path: Path) -> str:
    """The chain ID of the image's top layer: the snapshot key containerd unpacks it to."""
    with tarfile.open(path) as tar:
        manifest = _read_json(path, tar, _blob(archive_digest(path)))
        config = _read_json(path, tar, _blob(manifest["config"]["digest"]))
    chain = ""
    for diff_id in config["rootfs"]["diff_ids"]:
        chain = (
            diff_id if not chain else "sha256:" + sha256(f"{chain} {diff_id}".encode()).hexdigest()
        )
    if not chain:
        raise ImagesError(f"{path}: the image has no layers")
    return chain


# Builds of one image kept beside the newest: two checkouts on one machine (a
# worktree, a CI clone) each find theirs instead of deleting the other's.
KEEP_BUILDS = 3


def prune_builds(archives: Path, newest: Path) -> list[Path]:
    """Remove all but the KEEP_BUILDS most recent builds of newest's image; what went."""
    prefix = newest.name.rsplit("-", 1)[0]
    builds = sorted(
        (a for a in archives.glob(f"{prefix}-*.oci.tar") if a.name.rsplit("-", 1)[0] == prefix),
        key=lambda a: (a == newest, a.stat().st_mtime),
        reverse=True,
    )
    gone = []
    for stale in builds[KEEP_BUILDS:]:
        for part in (stale, stale.with_suffix(".json")):
            part.unlink(missing_ok=True)
            gone.append(part)
    return gone


def export(buildah: Buildah, layout: Layout, name: str, key: str, started: float) -> ImageArchive:
    """`buildah push NAME oci-archive:FILE:NAME`, then the note that marks it complete."""
    path = archive_path(layout, name, key)
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    with step(f"export {name} -> {path.name}"):
        buildah.run(
            "push",
            "--quiet",
            name,
            f"oci-archive:{partial}:{name}",
            log=layout.logs / "export.log",
            what=f"buildah push {name}",
        )
        digest = archive_digest(partial)
        os.replace(partial, path)
        note = {"name": name, "key": key, "digest": digest, "created": int(time.time())}
        path.with_suffix(".json").write_text(json.dumps(note, indent=2) + "\n")
    prune_builds(layout.archives, path)
    size = path.stat().st_size >> 20
    say(f"{name}: {digest} ({size} MiB)")
    return ImageArchive(name=name, path=path, digest=digest, seconds=time.monotonic() - started)


def _ctr(ctr: Path, address: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ctr), "--address", address, "--namespace", namespace, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CTR_TIMEOUT_S,
        check=False,
    )


def containerd_images(ctr: Path, address: str, namespace: str = NAMESPACE) -> dict[str, str]:
    """name -> manifest digest of the images containerd has in namespace."""
    proc = _ctr(ctr, address, namespace, "images", "list")
    if proc.returncode != 0:
        raise ImagesError(f"ctr images list at {address} failed: {proc.stderr.strip()}")
    images: dict[str, str] = {}
    for line in proc.stdout.splitlines()[1:]:  # REF TYPE DIGEST SIZE PLATFORMS LABELS
        fields = line.split()
        if len(fields) >= 3:
            images[fields[0]] = fields[2]
    return images


def is_unpacked(
    ctr: Path,
    address: str,
    image: ImageArchive,
    *,
    namespace: str = NAMESPACE,
    snapshotter: str = SNAPSHOTTER,
) -> bool:
    """containerd has the image's top layer unpacked in snapshotter (what the kubelet runs)."""
    chain = archive_chain_id(image.path)
    proc = _ctr(ctr, address, namespace, "snapshots", "--snapshotter", snapshotter, "info", chain)
    return proc.returncode == 0


def import_images(
    ctr: Path,
    address: str,
    images: Sequence[ImageArchive],
    *,
    namespace: str = NAMESPACE,
    snapshotter: str = SNAPSHOTTER,
) -> None:
    """Import each archive into containerd, unpacked for snapshotter.

    An image whose name already points at the same digest, unpacked, is skipped.
    """
    present = containerd_images(ctr, address, namespace)
    for image in images:
        if present.get(image.name) == image.digest and is_unpacked(
            ctr, address, image, namespace=namespace, snapshotter=snapshotter
        ):
            say(f"import {image.name}: already in containerd ({image.digest[:19]})")
            continue
        with step(f"import {image.name} into containerd ({namespace})"):
            proc = _ctr(
                ctr,
                address,
                namespace,
                "images",
                "import",
                "--snapshotter",
                snapshotter,
                str(image.path),
            )
            if proc.returncode != 0:
                raise ImagesError(
                    f"ctr images import {image.path} failed (exit {proc.returncode}): "
                    f"{(proc.stderr or proc.stdout).strip()}"
                )
    present = containerd_images(ctr, address, namespace)
    wrong = [
        f"{i.name} ({present.get(i.name)}, expected {i.digest}, unpacked)"
        for i in images
        if present.get(i.name) != i.digest
        or not is_unpacked(ctr, address, i, namespace=namespace, snapshotter=snapshotter)
    ]
    if wrong:
        raise ImagesError(f"after import, containerd does not have: {', '.join(wrong)}")
