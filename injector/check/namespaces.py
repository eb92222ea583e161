"""The opted-in namespaces, and an opt-in label where it has no effect.

Any Pod Security level works for an opted-in namespace: what the injector
adds passes `restricted`. Which namespaces are opted in is the namespace
controller's own rule (`injector.namespaces.opted_in`), so the check and the
controller cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from injector.check.rows import CheckId, Row, listed, plural, unreadable
from injector.check.state import Obj, Unreadable, dig, labels_of, name_of
from injector.config import InjectorConfig
from injector.namespaces import opted_in


def _active(namespace: Obj) -> bool:
    return bool(dig(namespace, "status", "phase") != "Terminating")


def opted_in_namespaces(namespaces: Iterable[Obj], config: InjectorConfig) -> list[str]:
    """The namespaces whose Bento pods are injected (not terminating), sorted."""
    return sorted(
        name_of(ns)
        for ns in namespaces
        if _active(ns) and opted_in(name_of(ns), labels_of(ns), config)
    )


def check_namespaces(namespaces: Sequence[Obj] | Unreadable, config: InjectorConfig) -> list[Row]:
    """Which namespaces are opted in; any Pod Security level works for them."""
    check: CheckId = "namespaces-opted-in"
    if isinstance(namespaces, Unreadable):
        return [unreadable(check, "namespaces", "namespaces", namespaces)]
    keys = config.labels
    opt_in = f"{keys.namespace_opt_in}={keys.namespace_opt_in_value}"
    rows = []
    for ns in sorted(namespaces, key=name_of):
        name, labels = name_of(ns), labels_of(ns)
        if name in config.excluded_namespaces and labels.get(keys.namespace_opt_in) == (
            keys.namespace_opt_in_value
        ):
            rows.append(
                Row(
                    "namespace-excluded",
                    f"namespace {name}",
                    "warn",
                    f"labelled {opt_in}, but the injector never mutates it "
                    "(a system namespace, or its own)",
                    f"run Bentos in another namespace; kubectl label namespace {name} "
                    f"{keys.namespace_opt_in}-",
                )
            )
    opted = opted_in_namespaces(namespaces, config)
    if not opted:
        rows.append(
            Row(
                check,
                "namespaces",
                "warn",
                f"no namespace is labelled {opt_in}: nothing is injected",
                f"kubectl label namespace NAME {opt_in}",
            )
        )
        return rows
    rows.append(
        Row(
            check,
            "namespaces",
            "ok",
            f"{plural(len(opted), 'namespace')} opted in: {listed(opted)}; any Pod Security "
            f"level works (the injected {config.sidecar.container_name} sidecar passes restricted)",
        )
    )
    return rows
