"""containerd 2.x for the node: its config, and the process inside the node's namespaces.

Every path containerd would write outside its own root (state, sockets, the
`opt` plugin, pod network namespaces, CNI results) is pointed under the
node's directory. The settings this kind of machine needs are commented
where they are set; see ../shared/notes/real-node.md for how they were found.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.processes import log_tail, spawn_group, stop_group

NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin uses


class ContainerdError(RuntimeError):
    """containerd did not start; the message ends with its log tail."""


@dataclass(frozen=True)
class ContainerdPaths:
    """Where one node's containerd keeps everything.

    Sockets go to their own short directory: a unix socket path may not be
    longer than 107 bytes, and state dirs under pytest's tmp paths are.
    """

    dir: Path
    socket_dir: Path

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def socket(self) -> Path:
        return self.socket_dir / "containerd.sock"

    @property
    def config(self) -> Path:
        return self.dir / "config.toml"

    @property
    def cni_conf_dir(self) -> Path:
        return self.dir / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.dir / "cni" / "ipam"

    @property
    def log(self) -> Path:
        return self.dir / "containerd.log"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"


def _toml_str(value: str | Path) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def containerd_config(
    paths: ContainerdPaths, *, sandbox_image: str, runc: Path, cni_bin_dirs: Sequence[Path]
) -> str:
    """The config.toml (version 3) for one node's containerd."""
    q = _toml_str
    cri_runtime = "plugins.'io.containerd.cri.v1.runtime'"
    runc_runtime = f"{cri_runtime}.containerd.runtimes.runc"
    return f"""version = 3
root = {q(paths.root)}
state = {q(paths.state)}
# NRI would open /var/run/nri; nothing here uses it.
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = {q(paths.socket)}

[ttrpc]
  address = {q(str(paths.socket) + ".ttrpc")}

[plugins.'io.containerd.internal.v1.opt']
  # Otherwise containerd creates /opt/containerd on the host.
  path = {q(paths.dir / "opt")}

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    # Imported locally (no registry): pinned, so neither pulled nor garbage-collected.
    sandbox = {q(sandbox_image)}

[{cri_runtime}]
  # The capability bounding set here lacks CAP_SYS_RESOURCE: runc cannot set the
  # sandbox's oom_score_adj of -998 and fails with "can't get final child's PID
  # from pipe" unless the score is clamped to containerd's own.
  restrict_oom_score_adj = true
  # Pod network namespaces under our state dir, not /var/run/netns.
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [{cri_runtime}.containerd]
    default_runtime_name = "runc"
  [{runc_runtime}]
    runtime_type = "io.containerd.runc.v2"
  [{runc_runtime}.options]
    BinaryName = {q(runc)}
    SystemdCgroup = false
  [{cri_runtime}.cni]
    bin_dirs = [{", ".join(q(d) for d in cni_bin_dirs)}]
    conf_dir = {q(paths.cni_conf_dir)}
    max_conf_num = 1

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def cni_config(paths: ContainerdPaths, pod_cidr: str, bridge: str = "cni0") -> dict[str, object]:
    """A bridge network with host-local IPAM over pod_cidr, plus portmap."""
    return {
        "cniVersion": "1.0.0",
        "name": "bento-juicefs",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                # The host routes the pod CIDR to the node: no masquerading needed.
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(paths.cni_ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


class Containerd:
    """One containerd process, started under `prefix` (the node's nsenter)."""

    def __init__(
        self,
        paths: ContainerdPaths,
        *,
        containerd: Path,
        shim_dir: Path,
        ctr: Path,
        prefix: Sequence[str] = (),
    ) -> None:
        self.paths = paths
        self.binary = containerd
        self.shim_dir = shim_dir
        self.ctr_binary = ctr
        self.prefix = list(prefix)
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self, config: str, cni: dict[str, object]) -> None:
        for d in (
            self.paths.root,
            self.paths.state,
            self.paths.cni_conf_dir,
            self.paths.socket_dir,
        ):
            d.mkdir(parents=True, exist_ok=True)
        self.paths.config.write_text(config)
        (self.paths.cni_conf_dir / "10-bento-juicefs.conflist").write_text(
            json.dumps(cni, indent=2) + "\n"
        )

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*self.prefix, str(self.ctr_binary), "--address", str(self.paths.socket), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if check and proc.returncode != 0:
            raise ContainerdError(f"ctr {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def start(self, timeout: float = 30.0) -> float:
        """Start containerd and wait until it answers; the seconds it took."""
        started = time.monotonic()
        # containerd finds its shim on PATH; runc and CNI plugins are configured by path.
        env = {
            "PATH": f"{self.shim_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        }
        self.process = spawn_group(
            [*self.prefix, str(self.binary), "--config", str(self.paths.config)],
            self.paths.log,
            env=env,
        )
        while self.ctr("version", check=False).returncode != 0:
            if self.process.poll() is not None:
                raise ContainerdError(
                    f"containerd exited with code {self.process.returncode}:\n"
                    f"{log_tail(self.paths.log)}"
                )
            if time.monotonic() - started > timeout:
                raise ContainerdError(
                    f"containerd did not answer within {timeout:.0f}s:\n{log_tail(self.paths.log)}"
                )
            time.sleep(0.05)
        return time.monotonic() - started

    def stop(self, timeout: float = 15.0) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_group(process, timeout)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None
