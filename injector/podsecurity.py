"""Pod Security Admission: deny, in the injector, Bento pods their namespace would refuse.

By default the `juicefs-mount` sidecar runs privileged (FUSE) as root, and on
the node cache mounts a hostPath: no version of the `baseline` or
`restricted` Pod Security level admits that. Without this check the pod would
be injected and then rejected by the PodSecurity admission plugin (which
runs after every mutating webhook) with a list of violations in a container
the user never wrote. The injector denies it first, saying why and what to do.

With `sidecar.unprivileged` nothing the injector adds needs more than
`restricted` (a non-root sidecar without capabilities, emptyDir volumes
only), so no level is a reason to deny; the plugin still judges the pod's
own containers, as for any pod.

The AdmissionReview does not carry the namespace's labels, so the namespace
controller (`injector.namespaces`), which watches every namespace anyway,
keeps the Pod Security labels of each opted-in namespace in a
`NamespaceSecurityRegistry`; the decision itself, `denial()`, is a pure
function of those labels, the pod and the config. A namespace the
controller has not seen yet (or an injector without the controller) is not
judged: Pod Security then has the last word, as before.

What the injector assumes about the cluster's PodSecurity AdmissionConfiguration
is the `podSecurity` section of its config: the defaults for a namespace
without the enforce label (Kubernetes' own: `privileged`, `latest`) and the
exemptions (none), which it mirrors. It follows the plugin's own reading of
the labels: an enforce level that is not a level is enforced as `restricted`,
a version that is not `latest` or `v1.<minor>` as `latest`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from injector.config import InjectorConfig, PodSecurityLevel
from injector.plan import InjectionPlan, shown

ENFORCE = "pod-security.kubernetes.io/enforce"
ENFORCE_VERSION = "pod-security.kubernetes.io/enforce-version"
WARN = "pod-security.kubernetes.io/warn"
AUDIT = "pod-security.kubernetes.io/audit"
LEVELS: tuple[PodSecurityLevel, ...] = get_args(PodSecurityLevel)
# As the PodSecurity plugin parses the version label.
_VERSION_RE = re.compile(r"v1\.(0|[1-9][0-9]*)")

Source = Literal["label", "invalid label", "default"]


@dataclass(frozen=True)
class NamespaceSecurity:
    """A namespace's Pod Security enforce labels, as written (None: no such label)."""

    level: str | None = None
    version: str | None = None

    @classmethod
    def from_labels(cls, labels: Mapping[str, str] | None) -> NamespaceSecurity:
        labels = labels or {}
        return cls(level=labels.get(ENFORCE), version=labels.get(ENFORCE_VERSION))


@dataclass(frozen=True)
class Enforcement:
    """What Pod Security enforces in a namespace, and why."""

    level: PodSecurityLevel
    version: str
    source: Source


def parse_version(value: str) -> str:
    """`latest` or `v1.<minor>`; anything else is read as `latest`, like the plugin does."""
    return value if value == "latest" or _VERSION_RE.fullmatch(value) else "latest"


def enforcement(state: NamespaceSecurity, config: InjectorConfig) -> Enforcement:
    """The level and version Pod Security enforces for pods in a namespace with these labels."""
    defaults = config.pod_security
    level: PodSecurityLevel
    source: Source
    if state.level is None:
        level, source = defaults.default_enforce, "default"
    elif state.level in LEVELS:
        level, source = state.level, "label"
    else:
        # The plugin fails closed on a level it cannot parse.
        level, source = "restricted", "invalid label"
    version = (
        parse_version(state.version)
        if state.version is not None
        else defaults.default_enforce_version
    )
    return Enforcement(level=level, version=version, source=source)


def exempt(
    namespace: str, username: str | None, runtime_class: str | None, config: InjectorConfig
) -> bool:
    """Whether the AdmissionConfiguration's exemptions (as configured here) let the pod through."""
    exemptions = config.pod_security
    return (
        namespace in exemptions.exempt_namespaces
        or (username is not None and username in exemptions.exempt_usernames)
        or (runtime_class is not None and runtime_class in exemptions.exempt_runtime_classes)
    )


def denial(
    namespace: str,
    state: NamespaceSecurity | None,
    plan: InjectionPlan,
    config: InjectorConfig,
    *,
    username: str | None = None,
    runtime_class: str | None = None,
) -> str | None:
    """Why Pod Security would refuse this injected pod, and what to do; None if it would not.

    None too when the check is off, the namespace is unknown, the pod is
    exempt, or the sidecar is unprivileged (it passes every level). Every
    version of `baseline` and `restricted` refuses a privileged container (and
    a hostPath volume), so only the level decides; the version is reported.
    """
    if not config.pod_security.enabled or state is None:
        return None
    if exempt(namespace, username, runtime_class, config):
        return None
    enforced = enforcement(state, config)
    if enforced.level not in refused_levels(config):
        return None
    return _message(namespace, state, enforced, plan, config)


def refused_levels(config: InjectorConfig) -> tuple[PodSecurityLevel, ...]:
    """The Pod Security levels that refuse what the injector adds to a pod.

    The privileged sidecar (and the node cache's hostPath) is refused by
    `baseline` and `restricted` alike; the unprivileged sidecar, with only
    emptyDir volumes, passes `restricted`, so by no level.
    """
    if config.sidecar.unprivileged:
        return ()
    return ("baseline", "restricted")


def _message(
    namespace: str,
    state: NamespaceSecurity,
    enforced: Enforcement,
    plan: InjectionPlan,
    config: InjectorConfig,
) -> str:
    level = f"{enforced.level}:{enforced.version}"
    if enforced.source == "label":
        why = f"label {ENFORCE}={enforced.level}"
    elif enforced.source == "invalid label":
        why = (
            f"label {ENFORCE}={shown(state.level)} is not a Pod Security level, "
            "which Pod Security enforces as restricted"
        )
    else:
        why = (
            f"no {ENFORCE} label: the cluster's default level, "
            "podSecurity.defaultEnforce in the injector's config"
        )
    needs = "must run privileged, as root, to mount the models with FUSE"
    if plan.cache_mode == "node":
        needs += ", and mounts the node's model cache (a hostPath volume)"
    sidecar, opt_out = config.sidecar.container_name, config.labels.inject
    return (
        f"namespace {namespace} enforces Pod Security level {level} ({why}), which refuses "
        f"the {sidecar} sidecar this pod needs: it {needs}. Pod Security would reject the "
        f"injected pod. Either let the namespace run privileged pods "
        f"(kubectl label namespace {namespace} {ENFORCE}=privileged --overwrite; keep "
        f"{WARN} and {AUDIT} at {enforced.level} to still see other pods' violations), "
        "or have the cluster's administrator turn on sidecar.unprivileged in the injector's "
        "config (the node agent then mounts for the sidecar, which passes restricted), "
        f"or opt this pod out with label {opt_out}=false (it then starts without the JuiceFS "
        "models: only for an image built with them)"
    )


class NamespaceSecurityRegistry:
    """The Pod Security labels of the opted-in namespaces, as the namespace controller saw them.

    `generation` changes whenever what `get` returns changes, so answers
    cached under an older generation are never replayed.
    """

    def __init__(self) -> None:
        self._known: dict[str, NamespaceSecurity] = {}
        self.generation = 0

    def get(self, namespace: str) -> NamespaceSecurity | None:
        return self._known.get(namespace)

    def observe(self, namespace: str, labels: Mapping[str, str] | None) -> None:
        state = NamespaceSecurity.from_labels(labels)
        if self._known.get(namespace) != state:
            self._known[namespace] = state
            self.generation += 1

    def forget(self, namespace: str) -> None:
        if self._known.pop(namespace, None) is not None:
            self.generation += 1

    def retain(self, namespaces: Iterable[str]) -> None:
        """Forget every namespace but these (after a fresh list)."""
        keep = set(namespaces)
        for namespace in [n for n in self._known if n not in keep]:
            self.forget(namespace)

    def __len__(self) -> int:
        return len(self._known)


# The injector process's registry: the namespace controller writes it, review() reads it.
NAMESPACES = NamespaceSecurityRegistry()
