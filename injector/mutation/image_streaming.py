"""Image streaming: steer to streaming node pools, warn about images that cannot stream."""

from __future__ import annotations

from fnmatch import fnmatchcase

from injector.mutation.affinity import apply_policy
from injector.mutation.context import MutationContext


def normalize_image(image: str) -> str:
    """Fully qualify an image reference the way container runtimes do."""
    first, sep, _ = image.partition("/")
    if not sep:
        return f"docker.io/library/{image}"
    if "." in first or ":" in first or first == "localhost":
        return image
    return f"docker.io/{image}"


def can_stream(image: str, patterns: tuple[str, ...]) -> bool:
    full = normalize_image(image)
    return any(fnmatchcase(full, pattern) for pattern in patterns)


def add_image_streaming(ctx: MutationContext) -> None:
    cluster = ctx.config.cluster
    profile = cluster.profile
    if profile.streaming_node_label:
        label = profile.streaming_node_label
        apply_policy(ctx, profile.streaming_affinity, label, profile.streaming_weight)
    if not profile.streamable_images:
        return
    ours = ctx.owned.container
    for key in ("initContainers", "containers"):
        for container in ctx.containers(key):
            image = container.get("image")
            if container.get("name") == ours or not isinstance(image, str):
                continue
            if not can_stream(image, profile.streamable_images):
                shown = image if len(image) <= 80 else image[:77] + "..."
                ctx.warnings.append(
                    f"{container.get('name')}: image {shown} cannot use "
                    f"{profile.description or cluster.platform_profile}; it is pulled in full"
                )
