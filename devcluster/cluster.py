"""kubectl access to a cluster, plus helpers that work on any cluster (local or kind)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

NOT_READY_TAINT = "node.kubernetes.io/not-ready"


class Cluster:
    """A cluster reached through a kubeconfig and a kubectl binary."""

    def __init__(self, kubeconfig: Path, kubectl_path: Path | str = "kubectl") -> None:
        self.kubeconfig = Path(kubeconfig)
        self.kubectl_path = str(kubectl_path)

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; raises CalledProcessError (with stderr) on failure."""
        proc = subprocess.run(
            [self.kubectl_path, "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(
                proc.returncode, proc.args, output=proc.stdout, stderr=proc.stderr
            )
        return proc

    def get_json(self, *args: str) -> Any:
        """`kubectl get ARGS -o json`, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, manifest: str | Mapping[str, Any]) -> None:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        self.kubectl("apply", "-f", "-", input=text)

    def create_namespace(
        self, name: str, labels: Mapping[str, str] | None = None, *, timeout: float = 30
    ) -> None:
        """Create a namespace and wait for its `default` ServiceAccount (pods need it)."""
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": dict(labels or {})},
            }
        )
        wait_for(
            lambda: (
                self.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode
                == 0
            ),
            timeout=timeout,
            what=f"ServiceAccount {name}/default",
        )

    def wait_provisioned(
        self,
        namespace: str,
        secret: str = "juicefs-models-credentials",
        timeout: float = 60,
    ) -> None:
        """Until the injector's namespace controller has given an opted-in namespace
        what its pods need: the credentials Secret (tenants get no RBAC from it)."""

        def provisioned() -> bool:
            found = self.kubectl("get", "secret", secret, "-n", namespace, check=False)
            return found.returncode == 0

        wait_for(provisioned, timeout=timeout, what=f"{secret} in {namespace}")

    def register_fake_node(
        self,
        name: str,
        labels: Mapping[str, str] | None = None,
        cpu: str = "4",
        memory: str = "16Gi",
        ephemeral_storage: str = "100Gi",
        pods: str = "110",
        extra_resources: Mapping[str, str] | None = None,
    ) -> None:
        """Create a schedulable Node with no kubelet behind it.

        The node gets capacity/allocatable and a Ready condition (status is a
        subresource, so it is patched after the create); the `not-ready` taint
        that the TaintNodesByCondition admission plugin adds on create is removed.
        Pods bound to it stay Pending forever (nothing runs them), which is all
        scheduling tests need.
        """
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {"kubernetes.io/hostname": name, **(labels or {})},
                },
            }
        )
        resources = {
            "cpu": cpu,
            "memory": memory,
            "ephemeral-storage": ephemeral_storage,
            "pods": pods,
            **(extra_resources or {}),
        }
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = {
            "status": {
                "capacity": resources,
                "allocatable": resources,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "fake node registered by devcluster",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
                "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux"},
            }
        }
        self.kubectl(
            "patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(status)
        )
        taints = self.get_json("node", name).get("spec", {}).get("taints") or []
        kept = [t for t in taints if t.get("key") != NOT_READY_TAINT]
        if kept != taints:
            patch = [{"op": "replace", "path": "/spec/taints", "value": kept}]
            self.kubectl("patch", "node", name, "--type=json", "-p", json.dumps(patch))


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.25,
    what: str = "condition",
) -> T:
    """Call `probe` until it returns something truthy; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
