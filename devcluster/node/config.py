"""The kubelet's and kube-proxy's configuration for this kind of machine (pure functions)."""

from __future__ import annotations

from pathlib import Path

from devcluster.control.pki import KeyPair


def kubelet_config(
    *,
    node_ip: str,
    ca_file: Path,
    serving: KeyPair,
    runtime_endpoint: str,
    pod_logs_dir: Path,
    resolv_conf: Path,
    cluster_dns: str,
    cgroup_root: str,
) -> dict[str, object]:
    """The KubeletConfiguration for this kind of machine."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node_ip,
        "healthzBindAddress": "127.0.0.1",
        "readOnlyPort": 0,
        "tlsCertFile": str(serving.cert),
        "tlsPrivateKeyFile": str(serving.key),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_file)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": runtime_endpoint,
        # cgroup v1 here, no systemd: the kubelet refuses v1 unless told.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": True,
        "cgroupRoot": cgroup_root,
        "enforceNodeAllocatable": ["pods"],
        "failSwapOn": False,
        "podLogsDir": str(pod_logs_dir),
        "resolvConf": str(resolv_conf),
        # No cluster DNS runs; an address where nothing answers on port 53 makes
        # lookups fail at once (and spares every pod a MissingClusterDNS warning).
        "clusterDNS": [cluster_dns],
        "clusterDomain": "cluster.local",
        # Imported images cannot be pulled back: never garbage-collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # A shared disk and a faked memory size: evict only when really out.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "serializeImagePulls": False,
        "nodeStatusUpdateFrequency": "4s",
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "10s",
        "shutdownGracePeriod": "0s",
        "maxPods": 110,
    }


def kube_proxy_config(*, kubeconfig: Path, node: str, pod_cidr: str) -> dict[str, object]:
    """iptables mode, touching no global sysctl (the node is a network namespace)."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "hostnameOverride": node,
        "clusterCIDR": pod_cidr,
        "bindAddress": "0.0.0.0",
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # nf_conntrack_max and the TCP timeouts are host-wide: leave them alone.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        # route_localnet is a sysctl the node should not need.
        "iptables": {"localhostNodePorts": False},
    }


# sun_path holds 108 bytes with the NUL: a unix socket path has at most 107.
UNIX_SOCKET_PATH_MAX = 107
# The deepest socket the kubelet binds under its root dir: pod-resources/<10 digits>.
_DEEPEST_KUBELET_SOCKET = "pod-resources/0123456789"


def kubelet_root_problem(root_dir: Path) -> str | None:
    """Why the kubelet could not bind its sockets under root_dir, or None.

    Past the limit the kubelet only logs `bind: invalid argument` for its
    pod-resources socket and the node never turns Ready.
    """
    deepest = f"{root_dir}/{_DEEPEST_KUBELET_SOCKET}"
    if len(deepest) <= UNIX_SOCKET_PATH_MAX:
        return None
    return (
        f"the kubelet's root dir {root_dir} is too deep: its sockets (e.g. {deepest}, "
        f"{len(deepest)} bytes) would pass the {UNIX_SOCKET_PATH_MAX}-byte limit of a unix "
        f"socket path; use a state dir {len(deepest) - UNIX_SOCKET_PATH_MAX} bytes shorter"
    )
