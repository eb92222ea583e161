"""The server's version against native sidecars and `cluster.kubernetesVersion`.

Native sidecars (initContainers with restartPolicy: Always) run from 1.29;
the config's `cluster.kubernetesVersion` decides which kind the injector
adds, so the two must agree.
"""

from __future__ import annotations

from injector.check.rows import CheckId, Row
from injector.check.state import Obj
from injector.config import InjectorConfig

# Native sidecars (initContainers with restartPolicy: Always) are on by default from 1.29.
NATIVE_SIDECARS = (1, 29)


def parse_server_version(version: Obj) -> tuple[int, int] | None:
    """(major, minor) from /version; GKE's and EKS's minors look like `30+`."""
    try:
        major = int(str(version.get("major", "")).rstrip("+"))
        minor = int(str(version.get("minor", "")).rstrip("+"))
    except ValueError:
        git = str(version.get("gitVersion", "")).lstrip("v").split(".")
        try:
            major, minor = int(git[0]), int(git[1])
        except (ValueError, IndexError):
            return None
    return major, minor


def check_version(version: Obj, config: InjectorConfig) -> list[Row]:
    """The server's version against native sidecars and cluster.kubernetesVersion."""
    check: CheckId = "server-version"
    subject = "cluster"
    shown = str(version.get("gitVersion") or "unknown")
    parsed = parse_server_version(version)
    configured = config.cluster.kubernetes_version
    if parsed is None:
        return [
            Row(check, subject, "warn", f"cannot read the server's version ({shown}); not checked")
        ]
    server_native = parsed >= NATIVE_SIDECARS
    config_native = config.cluster.native_sidecars
    minor = f"{parsed[0]}.{parsed[1]}"
    if server_native and config_native:
        return [
            Row(
                check,
                subject,
                "ok",
                f"{shown}: native sidecars (1.29+); cluster.kubernetesVersion {configured}: "
                "the sidecar is initContainers[0] with restartPolicy: Always",
            )
        ]
    if server_native:
        return [
            Row(
                check,
                subject,
                "warn",
                f"{shown} runs native sidecars, but cluster.kubernetesVersion {configured} makes "
                "the injector add a classic one (containers[0] with a blocking postStart check; "
                "a Job's pod never completes while it runs)",
                f'set cluster.kubernetesVersion: "{minor}" in the injector config',
            )
        ]
    if config_native:
        return [
            Row(
                check,
                subject,
                "FAIL",
                f"{shown} has no native sidecars (1.29+), but cluster.kubernetesVersion "
                f"{configured} makes the injector add one: an init container with "
                "restartPolicy: Always that this server does not run beside the app",
                f'set cluster.kubernetesVersion: "{minor}" in the injector config '
                "(a classic sidecar), or upgrade the cluster to 1.29+",
            )
        ]
    return [
        Row(
            check,
            subject,
            "warn",
            f"{shown} predates native sidecars (1.29+); cluster.kubernetesVersion {configured}: "
            "the sidecar is classic (containers[0], blocking postStart check)",
            "upgrade to 1.29+ and set cluster.kubernetesVersion to match, for native sidecars",
        )
    ]
