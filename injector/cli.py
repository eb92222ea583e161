"""`python -m injector {render,config,serve,check}`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from common.logs import configure_logging
from injector import __version__
from injector.config import ConfigError, InjectorConfig, load_config
from injector.render import RenderError, dump_documents, render_text

# `check -o`: injector.check.report.OUTPUT_FORMATS, spelled out so that the
# other subcommands do not import the check (and its Kubernetes client).
CHECK_OUTPUTS = ("table", "json", "yaml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m injector", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    render = sub.add_parser("render", help="print a pod or workload as the webhook would inject it")
    render.add_argument("-f", "--filename", required=True, help="YAML file, or - for stdin")
    render.add_argument("--config", help="injector config file (YAML)")

    config = sub.add_parser("config", help="print the effective configuration")
    config.add_argument("--config", help="injector config file (YAML)")

    serve = sub.add_parser("serve", help="run the admission webhook server")
    serve.add_argument("--config", help="injector config file (YAML)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument(
        "--kubeconfig", help="kubeconfig to use instead of the in-cluster service account"
    )
    serve.add_argument(
        "--standalone",
        action="store_true",
        help="serve /mutate only: no CA Secret, caBundle or namespace controller",
    )
    serve.add_argument(
        "--extra-host",
        action="append",
        default=[],
        help="another DNS name or IP for the serving certificate (repeatable)",
    )
    check = sub.add_parser(
        "check",
        help="preflight: what the current cluster lacks for injection (exit 1 on a FAIL)",
    )
    check.add_argument(
        "--config",
        help="injector config file (YAML) to check against; "
        "default: the one in the injector's ConfigMap in the cluster",
    )
    check.add_argument(
        "--kubeconfig", help="kubeconfig to use instead of KUBECONFIG or ~/.kube/config"
    )
    check.add_argument("--context", help="the kubeconfig's context to use (default: its current)")
    check.add_argument(
        "-n",
        "--namespace",
        help="the injector's namespace (default: the config's webhook.namespace, "
        "bento-juicefs-system)",
    )
    check.add_argument(
        "-o",
        "--output",
        choices=CHECK_OUTPUTS,
        default="table",
        help="table (default), or a json or yaml document for scripts; the exit code is the same",
    )
    return parser


def _read_input(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    try:
        return Path(name).read_text()
    except OSError as err:
        raise RenderError(f"cannot read {name}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise RenderError(f"cannot read {name}: not a UTF-8 text file") from None


def cmd_render(args: argparse.Namespace, config: InjectorConfig) -> int:
    rendered = render_text(_read_input(args.filename), config)
    for note in rendered.notes:
        print(f"note: {note}", file=sys.stderr)
    for warning in rendered.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    sys.stdout.write(dump_documents(rendered.documents))
    return 0


def cmd_serve(args: argparse.Namespace, config: InjectorConfig) -> int:
    from injector.server import serve

    configure_logging(args.log_level)
    asyncio.run(
        serve(
            config,
            kubeconfig=args.kubeconfig,
            standalone=args.standalone,
            extra_hosts=args.extra_host,
        )
    )
    return 0


def cmd_check(args: argparse.Namespace, config: InjectorConfig) -> int:
    """Check the cluster against the config file given, else the injector's deployed one."""
    from injector.check import ConfigChoice, Unreachable, check_cluster, exit_code
    from injector.check.report import format_report

    given = ConfigChoice(config, args.config) if args.config else None
    try:
        checked = asyncio.run(
            check_cluster(args.kubeconfig, given, context=args.context, namespace=args.namespace)
        )
    except Unreachable as err:  # no cluster to check: exit 2 like the other errors
        print(f"error: {err}", file=sys.stderr)
        return 2
    used = checked.config
    sys.stdout.write(
        format_report(args.output, checked.rows, checked.cluster, used.source, used.config)
    )
    return exit_code(checked.rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        if args.command == "config":
            sys.stdout.write(config.to_yaml())
            return 0
        if args.command == "render":
            return cmd_render(args, config)
        if args.command == "check":
            return cmd_check(args, config)
        return cmd_serve(args, config)
    except (ConfigError, RenderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
