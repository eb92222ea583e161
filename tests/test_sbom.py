"""The image's SBOM (devcluster/images/sbom.py, `make release`) on a made-up OCI archive.

Two layers, as buildah writes them (the first gzipped, the second not): the
first installs two Debian packages, two Python distributions and a juicefs
binary; the second replaces the dpkg database and removes one distribution
(a whiteout). The SBOM lists what the image ends with.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

from devcluster.images.sbom import (
    DPKG_STATUS,
    JUICEFS,
    image_packages,
    parse_dpkg_status,
    parse_metadata,
    spdx_document,
)

SITE = "opt/bento-juicefs/lib/python3.11/site-packages"
JUICEFS_BYTES = b"\x7fELF not really juicefs"


def status(*packages: tuple[str, str, str]) -> str:
    return "\n".join(
        f"Package: {name}\nStatus: install ok {state}\nVersion: {version}\n"
        f"Architecture: amd64\nMaintainer: Debian Team <d@example.org>\n"
        f"Description: {name}\n long description\n"
        for name, version, state in packages
    )


def metadata(name: str, version: str, license_expression: str | None = None) -> str:
    extra = f"License-Expression: {license_expression}\n" if license_expression else ""
    return f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\n{extra}\nThe README.\n"


def layer(files: dict[str, bytes], compress: bool) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    data = raw.getvalue()
    return gzip.compress(data) if compress else data


def oci_archive(path: Path, layers: list[bytes]) -> Path:
    blobs: dict[str, bytes] = {}

    def add(content: bytes) -> str:
        digest = f"sha256:{hashlib.sha256(content).hexdigest()}"
        blobs[digest] = content
        return digest

    manifest = {
        "schemaVersion": 2,
        "config": {"digest": add(b"{}"), "size": 2},
        "layers": [{"digest": add(data), "size": len(data)} for data in layers],
    }
    index = {"schemaVersion": 2, "manifests": [{"digest": add(json.dumps(manifest).encode())}]}
    with tarfile.open(path, "w") as tar:
        for name, content in [
            ("index.json", json.dumps(index).encode()),
            *((f"blobs/{d.replace(':', '/')}", c) for d, c in blobs.items()),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def test_a_status_file_lists_the_installed_packages_only() -> None:
    text = status(("libc6", "2.36-9", "installed"), ("gone", "1.0", "not-installed"))
    (libc,) = parse_dpkg_status(text)
    assert libc.name == "libc6"
    assert libc.purl == "pkg:deb/debian/libc6@2.36-9?arch=amd64&distro=debian-12"
    assert libc.supplier == "Organization: Debian Team <d@example.org>"


def test_a_distribution_is_named_as_pypi_names_it() -> None:
    package = parse_metadata(metadata("Prometheus_Client", "0.21.0", "Apache-2.0"))
    assert package.purl == "pkg:pypi/prometheus-client@0.21.0"
    assert package.license == "Apache-2.0"
    assert parse_metadata(metadata("x", "1")).license == "NOASSERTION"


def test_the_sbom_lists_what_the_last_layer_leaves(tmp_path: Path) -> None:
    first = layer(
        {
            DPKG_STATUS: status(("libc6", "2.36-9", "installed")).encode(),
            f"{SITE}/aiohttp-3.14.5.dist-info/METADATA": metadata("aiohttp", "3.14.5").encode(),
            f"{SITE}/old-1.0.dist-info/METADATA": metadata("old", "1.0").encode(),
            f"{SITE}/aiohttp/__init__.py": b"",
            JUICEFS: JUICEFS_BYTES,
        },
        compress=True,
    )
    second = layer(
        {
            DPKG_STATUS: status(
                ("libc6", "2.36-9", "installed"), ("fuse3", "3.14.0-4", "installed")
            ).encode(),
            f"{SITE}/.wh.old-1.0.dist-info": b"",
        },
        compress=False,
    )
    archive = oci_archive(tmp_path / "image.oci.tar", [first, second])
    packages = image_packages(archive, "1.4.2")
    assert [p.name for p in packages] == ["fuse3", "libc6", "aiohttp", "juicefs"]
    juicefs = packages[-1]
    assert juicefs.sha256 == hashlib.sha256(JUICEFS_BYTES).hexdigest()
    assert juicefs.purl == "pkg:github/juicedata/juicefs@v1.4.2"


def test_the_document_is_spdx_2_3_describing_the_image_that_contains_each_package(
    tmp_path: Path,
) -> None:
    packages = [
        parse_metadata(metadata("aiohttp", "3.14.5")),
        parse_metadata(metadata("yarl", "1.22.0")),
    ]
    digest = "sha256:" + "ab" * 32
    image = "ghcr.io/bentoml/bento-juicefs-sidecar:0.1.0"
    document = spdx_document(image, digest, packages, "2026-12-08T00:00:00Z", "test")
    assert document["spdxVersion"] == "SPDX-2.3"
    assert document["dataLicense"] == "CC0-1.0"
    assert (
        document["documentNamespace"]
        == spdx_document(image, digest, [], "x", "y")["documentNamespace"]
    ), "one image, one namespace"
    ids = [p["SPDXID"] for p in document["packages"]]
    assert len(set(ids)) == len(ids) == 3
    root = document["packages"][0]
    assert root["externalRefs"][0]["referenceLocator"].startswith(
        f"pkg:oci/bento-juicefs-sidecar@{digest}?repository_url=ghcr.io/bentoml/"
    )
    assert root["checksums"] == [{"algorithm": "SHA256", "checksumValue": "ab" * 32}]
    relations = {
        (r["relationshipType"], r["relatedSpdxElement"]) for r in document["relationships"]
    }
    assert relations == {("DESCRIBES", "SPDXRef-Image"), *(("CONTAINS", i) for i in ids[1:])}
    for package in document["packages"]:
        assert {"name", "versionInfo", "downloadLocation", "licenseConcluded"} <= set(package)
