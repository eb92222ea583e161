"""An SPDX 2.3 SBOM of an image, read from the image's own layers.

What the image holds, not what its inputs asked for: the Debian packages of
its dpkg database, the Python distributions of its venv (their `.dist-info`
METADATA), and the JuiceFS binary with its SHA-256. The layers of the OCI
archive are read in order, whiteouts applied, so a file a later layer
removed or replaced counts as the later layer left it.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path, PurePosixPath
from typing import Any

from devcluster.images.oci import archive_layers

VENV = "opt/bento-juicefs"
DPKG_STATUS = "var/lib/dpkg/status"
JUICEFS = f"{VENV}/bin/juicefs"
_METADATA = re.compile(
    rf"^{re.escape(VENV)}/lib/python3\.\d+/site-packages/[^/]+\.dist-info/METADATA$"
)
DEBIAN_DISTRO = "debian-12"  # bookworm, the base's release


@dataclass(frozen=True)
class Package:
    """One component of the image, as the SBOM lists it."""

    name: str
    version: str
    purl: str
    license: str = "NOASSERTION"
    sha256: str | None = None
    supplier: str = "NOASSERTION"


def parse_dpkg_status(text: str) -> list[Package]:
    """The installed packages of a dpkg status file."""
    found: list[Package] = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if "Package" not in fields or not fields.get("Status", "").endswith(" installed"):
            continue
        name, version, arch = (
            fields["Package"],
            fields.get("Version", ""),
            fields.get("Architecture", ""),
        )
        purl = f"pkg:deb/debian/{name}@{version}?arch={arch}&distro={DEBIAN_DISTRO}"
        found.append(
            Package(
                name, version, purl, supplier=f"Organization: {fields.get('Maintainer', 'Debian')}"
            )
        )
    return sorted(found, key=lambda p: p.name)


def parse_metadata(text: str) -> Package:
    """A Python distribution from its core METADATA."""
    headers = HeaderParser().parsestr(text)
    name, version = headers["Name"], headers["Version"]
    license_expression = headers.get("License-Expression") or "NOASSERTION"
    purl_name = re.sub(r"[-_.]+", "-", name).lower()
    return Package(name, version, f"pkg:pypi/{purl_name}@{version}", license_expression)


def _entries(archive_path: Path) -> Iterator[tuple[str, tarfile.TarFile, tarfile.TarInfo]]:
    """Every entry of every layer, bottom layer first: (normalised path, its layer, entry)."""
    layers = archive_layers(archive_path)
    with tarfile.open(archive_path) as archive:
        for layer_name in layers:
            raw = archive.extractfile(layer_name)
            assert raw is not None, layer_name
            with tarfile.open(fileobj=raw, mode="r|*") as layer:  # gzipped or not
                for entry in layer:
                    yield str(PurePosixPath(entry.name.lstrip("./"))), layer, entry


def image_files(archive_path: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The final content of every regular file `wanted` selects, whiteouts applied; a file
    named JUICEFS is hashed rather than kept (its value is its SHA-256, hex, as bytes)."""
    found: dict[str, bytes] = {}
    for path, layer, entry in _entries(archive_path):
        parent, _, base = path.rpartition("/")
        if base == ".wh..wh..opq":  # an opaque directory: what lower layers had there is gone
            found = {p: c for p, c in found.items() if not p.startswith(f"{parent}/")}
            continue
        if base.startswith(".wh."):
            removed = f"{parent}/{base[4:]}" if parent else base[4:]
            found = {
                p: c for p, c in found.items() if p != removed and not p.startswith(f"{removed}/")
            }
            continue
        if not entry.isfile() or not wanted(path):
            continue
        member = layer.extractfile(entry)
        assert member is not None, path
        if path == JUICEFS:
            digest = hashlib.sha256()
            while chunk := member.read(1 << 20):
                digest.update(chunk)
            found[path] = digest.hexdigest().encode()
        else:
            found[path] = member.read()
    return found


def wanted(path: str) -> bool:
    return path in (DPKG_STATUS, JUICEFS) or _METADATA.match(path) is not None


def image_packages(archive_path: Path, juicefs_version: str) -> list[Package]:
    """The Debian packages, the Python distributions and JuiceFS of the image."""
    files = image_files(archive_path, wanted)
    packages = parse_dpkg_status(files.get(DPKG_STATUS, b"").decode())
    python = [parse_metadata(c.decode()) for p, c in files.items() if _METADATA.match(p)]
    packages += sorted(python, key=lambda p: p.name.lower())
    if JUICEFS in files:
        packages.append(
            Package(
                "juicefs",
                juicefs_version,
                f"pkg:github/juicedata/juicefs@v{juicefs_version}",
                "Apache-2.0",
                files[JUICEFS].decode(),
                "Organization: Juicedata, Inc",
            )
        )
    return packages


def _spdx_id(index: int, package: Package) -> str:
    return f"SPDXRef-Package-{index}-{re.sub(r'[^A-Za-z0-9.-]', '-', package.name)}"


def _spdx_package(spdx_id: str, package: Package) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": package.name,
        "SPDXID": spdx_id,
        "versionInfo": package.version,
        "supplier": package.supplier,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": package.license,
        "copyrightText": "NOASSERTION",
        "externalRefs": [
            {
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": package.purl,
            }
        ],
    }
    if package.sha256 is not None:
        entry["checksums"] = [{"algorithm": "SHA256", "checksumValue": package.sha256}]
    return entry


def spdx_document(
    image: str, digest: str, packages: list[Package], created: str, tool: str
) -> dict[str, Any]:
    """SPDX 2.3 (JSON): the image, which it DESCRIBES, CONTAINS each package."""
    repository, _, tag = image.rpartition(":")
    image_package = Package(
        repository.rsplit("/", 1)[-1],
        tag,
        f"pkg:oci/{repository.rsplit('/', 1)[-1]}@{digest}?repository_url={repository}&tag={tag}",
        sha256=digest.removeprefix("sha256:"),
    )
    image_id = "SPDXRef-Image"
    # The same image, the same namespace: a rebuilt release's SBOM is the same document.
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"{image}@{digest}")
    ids = [_spdx_id(i, p) for i, p in enumerate(packages)]
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{image}@{digest}",
        "documentNamespace": f"https://spdx.org/spdxdocs/{image_package.name}-{namespace}",
        "creationInfo": {"created": created, "creators": [f"Tool: {tool}"]},
        "packages": [
            _spdx_package(image_id, image_package),
            *(_spdx_package(i, p) for i, p in zip(ids, packages, strict=True)),
        ],
        "relationships": [
            {
                "spdxElementId": "SPDXRef-DOCUMENT",
                "relationshipType": "DESCRIBES",
                "relatedSpdxElement": image_id,
            },
            *(
                {"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": i}
                for i in ids
            ),
        ],
    }
