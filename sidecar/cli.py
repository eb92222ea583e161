"""`python -m sidecar {probe}`: configured only by the env and args the injector sets."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sidecar.probe import mount_answers, wait_for_mount

DEFAULT_MOUNT_POINT = "/var/lib/juicefs/mnt"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar")
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="exit 0 once the JuiceFS mount answers")
    probe.add_argument(
        "--mount-point", default=os.environ.get("JFS_MOUNT_POINT", DEFAULT_MOUNT_POINT)
    )
    probe.add_argument("--wait", action="store_true", help="block until the mount answers")
    probe.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)

    mount_point = Path(args.mount_point)
    ok = wait_for_mount(mount_point, args.timeout) if args.wait else mount_answers(mount_point)
    if not ok:
        print(f"JuiceFS mount at {mount_point} does not answer yet", file=sys.stderr)
    return 0 if ok else 1
