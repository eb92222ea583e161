"""What a node puts on the host outside its directory, and taking all of it away.

The node's containers live in a cgroup root of its own, its processes in a
mount namespace of its own, its containerd sockets in a short /run path, and
a few paths the kubelet and CNI write that no flag moves get node-private
copies bind-mounted over them. `teardown_node` removes all of it from any
process (also after a crash); `node_leftovers` says what is still there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

from common.mounts import mounts
from devcluster.cluster import wait_for
from devcluster.node.mountns import NodeMountNamespace
from devcluster.node.netns import NodeNetwork
from modelstore.localcopy import MODELS_DIR, STAGING_DIR
from nodeagent.warmer import LOCAL_COPIES_DIR

CGROUP_V1 = Path("/sys/fs/cgroup")
# Paths the kubelet and CNI write that no flag moves: node-private copies are
# bind-mounted over them inside the node's mount namespace.
PRIVATE_HOST_DIRS = ("/var/log/containers", "/var/lib/cni", "/var/lib/kubelet")


class NodeHostError(RuntimeError):
    """Something the node made on the host cannot be removed."""


def _ns_inode(path: Path | str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in_mount_ns(ns_file: Path) -> list[int]:
    """Every process whose mount namespace is the one bound at ns_file."""
    target = _ns_inode(ns_file)
    if target is None:
        return []
    found = []
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != me and _ns_inode(entry / "ns/mnt") == target:
            found.append(int(entry.name))
    return found


def cgroup_dirs(root: str) -> list[Path]:
    """The node's cgroup directories in every v1 hierarchy (and the v2 one, if mounted)."""
    found = []
    if CGROUP_V1.is_dir():
        for hierarchy in CGROUP_V1.iterdir():
            candidate = hierarchy / root.lstrip("/")
            if candidate.is_dir():
                found.append(candidate)
    return found


def make_cgroups(root: str) -> None:
    """The node's cgroup root in every v1 hierarchy (the kubelet requires it to exist)."""
    if not CGROUP_V1.is_dir():
        return
    for hierarchy in CGROUP_V1.iterdir():
        if not (hierarchy / "cgroup.procs").exists():
            continue  # not a hierarchy (e.g. a symlink like cpu,cpuacct)
        group = hierarchy / root.lstrip("/")
        group.mkdir(exist_ok=True)
        # A new v1 cpuset takes no task until it has CPUs and memory nodes.
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if (group / knob).exists() and not (group / knob).read_text().strip():
                (group / knob).write_text((hierarchy / knob).read_text())


def kill_cgroups(root: str) -> None:
    """SIGKILL every process in the node's cgroups, then remove them bottom-up."""
    for top in cgroup_dirs(root):
        for procs in top.rglob("cgroup.procs"):
            for line in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(line), signal.SIGKILL)
    deadline = time.monotonic() + 10
    for top in cgroup_dirs(root):
        for directory in [
            *sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)),
            top,
        ]:
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise NodeHostError(f"cannot remove cgroup {directory}") from None
                    time.sleep(0.1)


CREATED_HOST_DIRS = "created-host-dirs.json"
# The node's "local SSD": where the injector's node cache lives on this node
# (cache.nodePath in the local injector's config), never a real host path.
NODE_CACHE_DIR = "local-ssd"


def node_cache_dir(directory: Path) -> Path:
    """The node cache directory of the node whose state is in directory."""
    return Path(directory) / NODE_CACHE_DIR


def local_copies_dir(node_cache: Path, volume: str) -> Path:
    """Where the node agent keeps its local copies of a volume's Bentos, under a node cache."""
    return Path(node_cache) / LOCAL_COPIES_DIR / volume


def copied_bytes(copies: Path, staged: bool = False) -> int:
    """The bytes of the files proven and kept in every copy under copies (local_copies_dir):
    each Bento version's models/; with staged, also what is written of the files still
    being streamed (what a warm stopped then resumes from)."""
    total = 0
    dirs = [MODELS_DIR, STAGING_DIR] if staged else [MODELS_DIR]
    for directory in (d for name in dirs for d in Path(copies).glob(f"*/*/{name}")):
        for path in directory.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file():
                    total += path.stat().st_size
    return total


# The kubelet's --root-dir on this node (pods/<uid>/volumes/... under it):
# what a real node has at /var/lib/kubelet.
KUBELET_ROOT_DIR = "kubelet"


def kubelet_root_dir(directory: Path) -> Path:
    """The kubelet's root dir (--root-dir) of the node whose state is in directory."""
    return Path(directory) / KUBELET_ROOT_DIR


SOCKETS_DIR = Path("/run/bento-juicefs")


def socket_dir(network: NodeNetwork) -> Path:
    """A short path for the node's containerd sockets (named after its netns)."""
    return SOCKETS_DIR / network.netns


def node_cgroup_root(network: NodeNetwork) -> str:
    """The cgroup (in every hierarchy) under which the node's kubelet puts all pods.

    Named after the node's network namespace, which is unique on the host.
    """
    return f"/{network.netns}"


def teardown_node(directory: Path, network: NodeNetwork) -> None:
    """Kill what a node left running and remove what it made on the host.

    Works from any process (`python -m devcluster down` after a crash): the
    node's containers by cgroup, then every process left in its mount
    namespace (containerd, shims, kubelet), then the namespace itself, whose
    mounts go with it, and the host directories it had to create.
    """
    ns = NodeMountNamespace(directory)
    kill_cgroups(node_cgroup_root(network))
    for pid in pids_in_mount_ns(ns.ns_file):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: not pids_in_mount_ns(ns.ns_file),
        timeout=10,
        what=f"the processes of the node in {directory} to exit",
    )
    ns.delete()
    shutil.rmtree(socket_dir(network), ignore_errors=True)
    with contextlib.suppress(OSError):
        SOCKETS_DIR.rmdir()  # the last node's
    record = directory / CREATED_HOST_DIRS
    if record.exists():
        for created in reversed(json.loads(record.read_text())):
            with contextlib.suppress(OSError):
                Path(created).rmdir()
        record.unlink()
    # The node cache goes with the node, as a real node's local SSD does.
    shutil.rmtree(node_cache_dir(directory), ignore_errors=True)


def node_leftovers(directory: Path, network: NodeNetwork) -> list[str]:
    """What a stopped node left on the host (empty when nothing)."""
    found = []
    ns = NodeMountNamespace(directory)
    if ns.exists():
        found.append(f"mount namespace {ns.ns_file}")
    if pids := pids_in_mount_ns(ns.ns_file):
        found.append(f"processes {pids}")
    found += [f"cgroup {d}" for d in cgroup_dirs(node_cgroup_root(network))]
    if network.exists():
        found.append(f"network namespace {network.netns} or veth {network.host_veth}")
    if socket_dir(network).exists():
        found.append(f"socket dir {socket_dir(network)}")
    found += [f"mount {m.point}" for m in mounts() if m.point.is_relative_to(directory)]
    if (directory / CREATED_HOST_DIRS).exists():
        found.append(f"host dirs listed in {directory / CREATED_HOST_DIRS}")
    if node_cache_dir(directory).exists():
        found.append(f"node cache {node_cache_dir(directory)}")
    return found
