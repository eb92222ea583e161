"""`python -m devcluster.images [--cache-dir DIR]`: build (or reuse) every image, print a table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from devcluster.images import ImagesError, default_cache_dir, ensure_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.images", description=__doc__)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"images cache (default {default_cache_dir()})",
    )
    args = parser.parse_args(argv)
    try:
        archives = ensure_images(args.cache_dir)
    except ImagesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    width = max(len(a.name) for a in archives)
    print(f"{'IMAGE':<{width}}  {'DIGEST':<71}  {'MiB':>5}  SECONDS  ARCHIVE")
    for archive in archives:
        print(
            f"{archive.name:<{width}}  {archive.digest:<71}  {archive.size / 2**20:>5.0f}  "
            f"{archive.seconds:>7.1f}  {archive.path}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
