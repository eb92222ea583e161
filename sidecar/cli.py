"""`python -m sidecar {run,probe,publish}`.

`run` and `probe` are configured only through the env and args the injector
sets; `publish` is for the Bento build pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from modelstore.mountcheck import mount_answers, wait_for_mount
from sidecar import env

DEFAULT_MOUNT_POINT = "/var/lib/juicefs/mnt"
DEFAULT_PATH_TEMPLATE = "/bentos/{name}/{version}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sidecar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="mount JuiceFS, stream the model, set the readiness condition")

    probe = sub.add_parser("probe", help="exit 0 once the JuiceFS mount answers")
    probe.add_argument(
        "--mount-point", default=os.environ.get(env.MOUNT_POINT, DEFAULT_MOUNT_POINT)
    )
    probe.add_argument("--wait", action="store_true", help="block until the mount answers")
    probe.add_argument("--timeout", type=float, default=300.0)

    publish = sub.add_parser("publish", help="copy a Bento's models into a mounted JuiceFS volume")
    publish.add_argument("models", type=Path, help="the Bento's models/ directory (BentoML layout)")
    publish.add_argument(
        "--volume", type=Path, required=True, help="where the JuiceFS volume is mounted"
    )
    publish.add_argument("--name", required=True, help="Bento name (yatai.ai/bento-repository)")
    publish.add_argument("--version", required=True, help="Bento version (yatai.ai/bento-version)")
    publish.add_argument("--path-template", default=DEFAULT_PATH_TEMPLATE)
    return parser


def _run() -> int:
    from common.logs import configure_logging
    from sidecar.agent import AgentChannel, AgentReporter
    from sidecar.run import run

    configure_logging()
    try:
        settings = env.Settings.from_env()
    except env.SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    socket_path = settings.agent_socket
    assert socket_path is not None  # from_env requires it

    async def main() -> int:
        # No Kubernetes credential and no privilege: the node agent mounts and reports for us.
        channel = AgentChannel(socket_path)
        try:
            return await run(settings, AgentReporter(channel), agent=channel)
        finally:
            channel.close()

    return asyncio.run(main())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run()
    if args.command == "publish":
        from modelstore.publish import PublishError, publish

        try:
            manifest = publish(
                args.models, args.volume, args.path_template, args.name, args.version
            )
        except PublishError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(
            f"published {manifest.bento}: {len(manifest.files)} files, {manifest.total_bytes} bytes"
        )
        return 0
    mount_point = Path(args.mount_point)
    ok = (
        wait_for_mount(mount_point, args.timeout, interval=0.1)
        if args.wait
        else mount_answers(mount_point)
    )
    if not ok:
        print(f"JuiceFS mount at {mount_point} does not answer yet", file=sys.stderr)
        socket_path = os.environ.get(env.AGENT_SOCKET)
        if socket_path and not Path(socket_path).exists():
            from sidecar.agent import NO_AGENT

            # The kubelet puts this in the probe's Event: say what is missing.
            print(NO_AGENT, file=sys.stderr)
    return 0 if ok else 1
