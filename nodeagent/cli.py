"""`python -m nodeagent run`: the node agent, as the DaemonSet runs it.

It reads the injector's config file (the same ConfigMap: one source for
labels, volumes, the node cache path and budget), the volumes' credentials
as files, and its identity from the env the DaemonSet sets (NODE_NAME,
POD_NAME, POD_NAMESPACE).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from common.logs import configure_logging
from injector.config import ConfigError, load_config
from injector.kube import new_api_client
from nodeagent.agent import AgentOptions, NodeAgent
from nodeagent.kube import AgentApi
from nodeagent.plan import DISK_MARGIN
from nodeagent.podmounts import PodMounts
from nodeagent.warmer import AgentIdentity

log = structlog.get_logger("nodeagent")

DEFAULT_CREDENTIALS_DIR = "/etc/bento-juicefs/credentials"
DEFAULT_WORK_DIR = "/var/lib/bento-juicefs-agent"
DEFAULT_KUBELET_ROOT = "/var/lib/kubelet"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nodeagent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="keep this node's cache warm with its Bentos' models")
    run.add_argument("--config", help="the injector's config file (defaults without it)")
    run.add_argument("--kubeconfig", help="default: in-cluster, else ~/.kube/config")
    run.add_argument(
        "--credentials-dir",
        type=Path,
        default=Path(DEFAULT_CREDENTIALS_DIR),
        help="one directory per JuiceFS volume, its Secret's keys as files",
    )
    run.add_argument("--work-dir", type=Path, default=Path(DEFAULT_WORK_DIR))
    run.add_argument(
        "--kubelet-root",
        type=Path,
        default=Path(DEFAULT_KUBELET_ROOT),
        help="the kubelet's root dir, where the pods' volumes are (mounted Bidirectional)",
    )
    run.add_argument("--juicefs", default="juicefs", help="the juicefs binary")
    run.add_argument("--resync-seconds", type=float, default=10.0)
    run.add_argument("--evict-after-seconds", type=float, default=3600.0)
    run.add_argument(
        "--disk-margin",
        type=float,
        default=DISK_MARGIN,
        help="the share of the node cache's disk kept free, above the kubelet's eviction "
        "threshold (0: none, as on a dev node sharing the host's disk)",
    )
    run.add_argument(
        "--scaled-to-zero-grace-seconds",
        type=float,
        default=3600.0,
        help="how long a workload scaled to zero still has its Bento held",
    )
    run.add_argument("--retry-seconds", type=float, default=60.0)
    run.add_argument(
        "--no-prewarm",
        dest="prewarm",
        action="store_false",
        help="warm a Bento only when a pod on this node asks for it, never ahead of its pods",
    )
    run.add_argument(
        "--startup-taint-timeout-seconds",
        type=float,
        default=600.0,
        help="how long after the node turned Ready the startup taint stays while its "
        "Bentos are not warm (then it goes, with a Warning Event)",
    )
    run.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""))
    run.add_argument("--pod-name", default=os.environ.get("POD_NAME", "bento-juicefs-node-agent"))
    run.add_argument(
        "--pod-namespace", default=os.environ.get("POD_NAMESPACE", "bento-juicefs-system")
    )
    run.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics (0: none)")
    run.add_argument("--log-level", default="info")
    return parser


# Threads for the blocking work (mounts, unmounts, socket replies): asyncio's
# default, cores + 4, is 6 on a 2-core node, and a FUSE daemon that hangs
# holds a thread in a syscall for as long as it hangs. With few threads a
# couple of hung pods would stall every other pod's mount on the node.
AGENT_THREADS = 128


async def _run(args: argparse.Namespace) -> int:
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(AGENT_THREADS, thread_name_prefix="agent")
    )
    config = load_config(args.config)
    if config.node_cache_path is None:
        log.error("agent.no_node_cache", profile=config.cluster.platform_profile)
        return 2
    options = AgentOptions(
        credentials_dir=args.credentials_dir,
        work_dir=args.work_dir,
        juicefs_bin=args.juicefs,
        resync_seconds=args.resync_seconds,
        evict_after_seconds=args.evict_after_seconds,
        retry_seconds=args.retry_seconds,
        scaled_to_zero_grace_seconds=args.scaled_to_zero_grace_seconds,
        disk_margin=args.disk_margin,
        prewarm=args.prewarm,
        startup_taint_timeout_seconds=args.startup_taint_timeout_seconds,
    )
    identity = AgentIdentity(args.node_name, args.pod_name, args.pod_namespace)
    api_client = await new_api_client(args.kubeconfig)
    api = AgentApi(api_client, args.node_name, args.pod_name)
    agent = NodeAgent(config, options, identity, api)
    pod_mounts = PodMounts(
        config, args.kubelet_root, api, args.work_dir / "stage", agent.seal, agent.served_copy
    )
    agent.pod_bentos = pod_mounts.bentos
    if args.metrics_port:
        agent.metrics.serve(args.metrics_port)
    task = asyncio.ensure_future(asyncio.gather(agent.run_forever(), pod_mounts.run_forever()))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # Cancelling unwinds the warm in progress: its mount is unmounted on the way out.
        loop.add_signal_handler(signum, task.cancel)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await api_client.close()
    log.info("agent.stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    if not args.node_name:
        print("--node-name (or NODE_NAME) is required", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args))
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
