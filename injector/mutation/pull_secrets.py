"""The sidecar's image pull secrets, added by name beside the pod's own."""

from __future__ import annotations

from collections.abc import Mapping

from injector.mutation.context import MutationContext

PULL_SECRETS = ("spec", "imagePullSecrets")


def add_image_pull_secrets(ctx: MutationContext) -> None:
    """Append each of sidecar.imagePullSecrets the pod does not name yet, in config order.

    The pod's own entries stay as they are and where they are; a name it
    already has is not added twice, so a re-invocation adds nothing.
    """
    # Only string names count: a malformed entry (a fuzzed `name: []`) is the
    # apiserver's to refuse, never a crash here.
    present: set[str] = {
        entry["name"]
        for entry in ctx.patch.get(PULL_SECRETS) or []
        if isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
    }
    for name in ctx.config.sidecar.image_pull_secrets:
        if name not in present:
            ctx.patch.append(PULL_SECRETS, {"name": name})
            present.add(name)
