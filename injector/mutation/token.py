"""The sidecar's service-account token: share the pod's, or project one for it alone.

The ServiceAccount admission plugin runs before webhooks: it mounted the
token into the containers it saw, not into the sidecar we add. So the
sidecar mounts that same volume when it is a plain projected token; otherwise
(automount off for the pod or its service account, a legacy token Secret, a
custom audience) it gets a token volume projected for it alone. Every step
and check asks `choose_token`, so they never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.env import DEFAULT_TOKEN_DIR
from injector.mutation.context import MutationContext

# Where Kubernetes mounts a service-account token, and so where the sidecar
# reads its own (common.env).
TOKEN_MOUNT_PATH = DEFAULT_TOKEN_DIR


@dataclass(frozen=True)
class TokenChoice:
    # The volume the sidecar mounts at TOKEN_MOUNT_PATH.
    volume: str
    # Whether that is our own projected volume, which the volumes step adds.
    projected_by_us: bool


def choose_token(ctx: MutationContext) -> TokenChoice:
    shared = _shared_token_volume(ctx)
    ours = ctx.owned.token_volume
    found = ctx.sidecar_index()
    if found is None:
        projected = shared is None
    else:
        # Already injected: the sidecar's own mounts say whether it uses ours.
        sidecar = ctx.containers(found[0])[found[1]]
        mounts = sidecar.get("volumeMounts") or []
        projected = any(isinstance(m, dict) and m.get("name") == ours for m in mounts)
    return TokenChoice(volume=shared or ours, projected_by_us=projected)


def _shared_token_volume(ctx: MutationContext) -> str | None:
    """The plain token volume the pod's other containers already mount, if any."""
    volumes = {v.get("name"): v for v in ctx.spec.get("volumes") or [] if isinstance(v, dict)}
    for key in ("containers", "initContainers"):
        for container in ctx.containers(key):
            if container.get("name") == ctx.owned.container:
                continue
            for mount in container.get("volumeMounts") or []:
                if isinstance(mount, dict) and mount.get("mountPath") == TOKEN_MOUNT_PATH:
                    name = mount.get("name")
                    return str(name) if _is_plain_token(volumes.get(name)) else None
    return None


def _is_plain_token(volume: dict[str, Any] | None) -> bool:
    """A projected token for the apiserver's own audience, as the admission plugin makes.

    Anything else at that path (a legacy token Secret, a custom audience) would
    get the sidecar's API calls refused, so it gets its own projection instead.
    """
    sources = ((volume or {}).get("projected") or {}).get("sources") or []
    tokens = [s.get("serviceAccountToken") for s in sources if isinstance(s, dict)]
    return any(isinstance(t, dict) and not t.get("audience") for t in tokens)


def token_mount(choice: TokenChoice) -> dict[str, Any]:
    return {"name": choice.volume, "mountPath": TOKEN_MOUNT_PATH, "readOnly": True}


def projected_token_volume(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "projected": {
            "defaultMode": 0o444,
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {
                    "configMap": {
                        "name": "kube-root-ca.crt",
                        "items": [{"key": "ca.crt", "path": "ca.crt"}],
                    }
                },
                {
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "namespace",
                                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                            }
                        ]
                    }
                },
            ],
        },
    }
