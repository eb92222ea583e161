"""The JuiceFS credentials Secret in the injector's namespace, and its copy in each opted-in one.

Names of keys only: values are never printed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from injector.check.namespaces import opted_in_namespaces
from injector.check.rows import CheckId, Row, Verdict, unreadable
from injector.check.state import Obj, Unreadable, labels_of, secret_bytes, secret_keys
from injector.config import InjectorConfig
from injector.namespaces import credential_secret_names


def check_credentials(
    namespaces: Sequence[Obj] | Unreadable,
    sources: Mapping[str, Obj | Unreadable | None],
    copies: Mapping[tuple[str, str], Obj | Unreadable | None],
    config: InjectorConfig,
) -> list[Row]:
    """The credentials Secret in the injector's namespace, and its copy in each opted-in one.

    The sidecar reads metaurl (required) and access-key/secret-key (optional:
    when the metadata engine does not hold them) by secretKeyRef; a missing
    Secret or metaurl leaves the pod in CreateContainerConfigError.
    """
    check: CheckId = "credentials-source"
    jfs = config.juicefs
    required, optional = jfs.meta_url_key, (jfs.access_key_key, jfs.secret_key_key)
    home = config.webhook.namespace
    default_secret = jfs.secret_name_template.format(volume=jfs.default_volume)
    opted = [] if isinstance(namespaces, Unreadable) else opted_in_namespaces(namespaces, config)
    rows = []
    for secret_name in credential_secret_names(config):
        subject = f"Secret {home}/{secret_name}"
        # Pods use the default volume's Secret unless an annotation picks another volume.
        needed = secret_name == default_secret
        verdict: Verdict = "FAIL" if needed else "warn"
        users = "every Bento pod" if needed else "pods whose annotation picks its volume"
        source = sources.get(secret_name)
        if isinstance(source, Unreadable):
            rows.append(unreadable(check, subject, "it", source))
            continue
        if source is None:
            rows.append(
                Row(
                    check,
                    subject,
                    verdict,
                    f"not found: {users} would start without credentials "
                    "(CreateContainerConfigError)",
                    f"kubectl -n {home} create secret generic {secret_name} "
                    f"--from-literal={required}=META-URL "
                    f"[--from-literal={optional[0]}=... --from-literal={optional[1]}=...]",
                )
            )
            continue
        value = secret_bytes(source, required)
        if not value:
            rows.append(
                Row(
                    check,
                    subject,
                    verdict,
                    f"no {required} key"
                    + (" (it is empty)" if value == b"" else "")
                    + f" (keys: {', '.join(secret_keys(source)) or 'none'}): {users} would fail",
                    f"add it: kubectl -n {home} patch secret {secret_name} --type merge "
                    f'-p \'{{"stringData":{{"{required}":"META-URL"}}}}\'',
                )
            )
            continue
        present = [k for k in optional if k in (source.get("data") or {})]
        note = (
            f", {', '.join(present)}"
            if present
            else " (no object-store keys: the metadata holds them)"
        )
        rows.append(Row(check, subject, "ok", f"keys {required}{note}; values not shown"))
        source_data = dict(source.get("data") or {})
        for namespace in opted:
            # Only where the volume is the namespace's (juicefs.volumeNamespaces).
            if secret_name in credential_secret_names(config, namespace):
                rows.append(
                    _check_copy(namespace, secret_name, copies, source_data, verdict, config)
                )
    return rows


def _check_copy(
    namespace: str,
    secret_name: str,
    copies: Mapping[tuple[str, str], Obj | Unreadable | None],
    source_data: Mapping[str, str],
    verdict: Verdict,
    config: InjectorConfig,
) -> Row:
    check: CheckId = "credentials-copy"
    subject = f"Secret {namespace}/{secret_name}"
    required = config.juicefs.meta_url_key
    controller = (
        "the injector's namespace controller copies it from "
        f"{config.webhook.namespace} within controller.resyncSeconds: is the injector running? "
        f"(kubectl -n {config.webhook.namespace} get pods; its log says namespace.*)"
    )
    copy = copies.get((namespace, secret_name))
    if isinstance(copy, Unreadable):
        return unreadable(check, subject, "it", copy)
    if copy is None:
        return Row(
            check,
            subject,
            verdict,
            "no copy in this opted-in namespace: its Bento pods fail with "
            "CreateContainerConfigError",
            controller,
        )
    ours = labels_of(copy).get("app.kubernetes.io/managed-by") == config.controller.managed_by
    if not secret_bytes(copy, required):
        fix = (
            controller
            if ours
            else f"it is not the injector's (no app.kubernetes.io/managed-by="
            f"{config.controller.managed_by}): add {required}, or delete it so the "
            "injector makes its copy"
        )
        return Row(
            check,
            subject,
            verdict,
            f"the copy has no {required} key (keys: {', '.join(secret_keys(copy)) or 'none'}): "
            "its Bento pods fail with CreateContainerConfigError",
            fix,
        )
    if not ours:
        return Row(
            check,
            subject,
            "warn",
            "a Secret that is not the injector's copy (someone else's with this name): "
            "the injector leaves it alone, so it does not follow the source",
            f"delete it if it is stale: kubectl -n {namespace} delete secret {secret_name}",
        )
    if dict(copy.get("data") or {}) != dict(source_data):
        return Row(
            check,
            subject,
            "warn",
            "differs from the source: the copy is stale until the controller applies it again",
            controller,
        )
    return Row(check, subject, "ok", "copied, same keys and values as the source")
