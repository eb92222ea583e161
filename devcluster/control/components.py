"""The control-plane components' command lines (pure functions of paths, ports and PKI)."""

from __future__ import annotations

from pathlib import Path

from devcluster.control.pki import ClusterPKI

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
ADMISSION_PLUGINS = (
    "NamespaceLifecycle",
    "NodeRestriction",
    "LimitRanger",
    "ServiceAccount",
    "PodSecurity",
    "ResourceQuota",
    "MutatingAdmissionWebhook",
    "ValidatingAdmissionWebhook",
    "ValidatingAdmissionPolicy",
    "MutatingAdmissionPolicy",
)
# No kubelet heartbeats: the node lifecycle controller would taint every node NotReady.
CONTROLLERS = "*,-node-lifecycle-controller"


def etcd_args(data_dir: Path, client_url: str, peer_url: str) -> list[str]:
    return [
        "--name=devcluster",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=devcluster={peer_url}",
        "--unsafe-no-fsync=true",
    ]


def apiserver_args(host: str, port: int, etcd_url: str, certs: Path, pki: ClusterPKI) -> list[str]:
    return [
        f"--bind-address={host}",
        f"--advertise-address={host}",
        # The endpoint reconciler refuses a loopback advertise address; with no
        # node nothing in the cluster needs the `kubernetes` Service's endpoints.
        *(["--endpoint-reconciler-type=none"] if host.startswith("127.") else []),
        f"--secure-port={port}",
        f"--etcd-servers={etcd_url}",
        f"--cert-dir={certs / 'kube-apiserver'}",
        f"--tls-cert-file={pki.apiserver.cert}",
        f"--tls-private-key-file={pki.apiserver.key}",
        f"--client-ca-file={pki.ca.cert}",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--authorization-mode=Node,RBAC",
        f"--kubelet-client-certificate={pki.apiserver_kubelet_client.cert}",
        f"--kubelet-client-key={pki.apiserver_kubelet_client.key}",
        f"--kubelet-certificate-authority={pki.ca.cert}",
        # No DNS for node names here: dial kubelets at their InternalIP.
        "--kubelet-preferred-address-types=InternalIP",
        # Webhook Services are called at their endpoints: no kube-proxy on the host.
        "--enable-aggregator-routing=true",
        "--allow-privileged=true",
        f"--enable-admission-plugins={','.join(ADMISSION_PLUGINS)}",
    ]


def controller_manager_args(kubeconfig: Path, port: int, certs: Path, pki: ClusterPKI) -> list[str]:
    return [
        f"--kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={certs / 'kube-controller-manager'}",
        "--leader-elect=false",
        f"--controllers={CONTROLLERS}",
        f"--service-account-private-key-file={pki.sa_key}",
        f"--root-ca-file={pki.ca.cert}",
        "--use-service-account-credentials=true",
        f"--cluster-signing-cert-file={pki.ca.cert}",
        f"--cluster-signing-key-file={pki.ca.key}",
    ]


def scheduler_args(kubeconfig: Path, port: int, certs: Path) -> list[str]:
    return [
        f"--kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={certs / 'kube-scheduler'}",
        "--leader-elect=false",
    ]
