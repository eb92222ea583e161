"""The namespace controller: the credentials it provisions, and the readiness RBAC it removes.

Older versions bound a readiness role in every opted-in namespace (the
privileged sidecar set its pod's condition with the pod's token); only the
node agent sets it now. The decision which RoleBinding to delete is a pure
function of the namespace's record; the controller acts on it against
stand-ins for the API.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from structlog.testing import capture_logs

from injector.config import InjectorConfig
from injector.kube import ApiException
from injector.namespaces import (
    LEGACY_ROLE_BINDING,
    PROVISIONED,
    LegacyRoleBindings,
    NamespaceController,
    credential_secret_names,
    legacy_role_bindings,
    recorded_objects,
    unassigned_secrets,
)

CONFIG = InjectorConfig()
OPT_IN = {"juicefs.bentoml.com/injection": "enabled"}
SECRET = "juicefs-models-credentials"


# --- the decisions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recorded", "expected"),
    [
        (None, []),
        ("", []),
        (f"secret/{SECRET}", [("secret", SECRET)]),
        (
            f"rolebinding/{LEGACY_ROLE_BINDING},secret/{SECRET}",
            [("rolebinding", LEGACY_ROLE_BINDING), ("secret", SECRET)],
        ),
        # What a hand edit may leave: blanks, empty items, a kind or a name missing.
        (f" secret/{SECRET} ,,rolebinding/,/x,junk", [("secret", SECRET)]),
    ],
)
def test_the_record_reads_as_kind_and_name(
    recorded: str | None, expected: list[tuple[str, str]]
) -> None:
    assert recorded_objects(recorded) == expected


@pytest.mark.parametrize("recorded", [None, "", f"secret/{SECRET}"])
def test_a_record_without_a_role_binding_leaves_nothing_to_remove(recorded: str | None) -> None:
    assert legacy_role_bindings(recorded) == LegacyRoleBindings()


def test_the_readiness_role_binding_of_an_older_version_is_deleted() -> None:
    recorded = f"rolebinding/{LEGACY_ROLE_BINDING},secret/{SECRET}"
    assert legacy_role_bindings(recorded) == LegacyRoleBindings(to_delete=(LEGACY_ROLE_BINDING,))


def test_a_role_binding_under_another_name_is_left_to_an_administrator() -> None:
    """The injector's RBAC lets it delete one name; another would fail every reconcile."""
    recorded = f"rolebinding/my-models-ready,rolebinding/{LEGACY_ROLE_BINDING}"
    assert legacy_role_bindings(recorded) == LegacyRoleBindings(
        to_delete=(LEGACY_ROLE_BINDING,), by_hand=("my-models-ready",)
    )


def test_a_secret_named_like_the_role_binding_is_not_one() -> None:
    assert legacy_role_bindings(f"secret/{LEGACY_ROLE_BINDING}") == LegacyRoleBindings()


# --- the controller against stand-ins for the API -----------------------------------------


class FakeCore:
    """The CoreV1Api calls of the controller: one source Secret, and what was done."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def read_namespaced_secret(self, name: str, namespace: str, **_: Any) -> Any:
        return SimpleNamespace(type="Opaque", data={"metaurl": "cmVkaXM6Ly94"})

    async def patch_namespaced_secret(
        self, name: str, namespace: str, body: dict[str, Any], **_: Any
    ) -> None:
        self.calls.append(("apply", f"secret/{name}", namespace))

    async def delete_namespaced_secret(self, name: str, namespace: str, **_: Any) -> None:
        self.calls.append(("delete", f"secret/{name}", namespace))

    async def patch_namespace(self, name: str, body: dict[str, Any], **_: Any) -> None:
        self.calls.append(("record", name, str(body["metadata"]["annotations"][PROVISIONED])))


class FakeRbac:
    def __init__(self, calls: list[tuple[str, ...]], status: int | None = None) -> None:
        self.calls = calls
        self.status = status

    async def delete_namespaced_role_binding(self, name: str, namespace: str, **_: Any) -> None:
        self.calls.append(("delete", f"rolebinding/{name}", namespace))
        if self.status is not None:
            raise ApiException(status=self.status, reason="Not Found")


def namespace(labels: dict[str, str], recorded: str | None) -> Any:
    annotations = {PROVISIONED: recorded} if recorded is not None else {}
    return SimpleNamespace(
        metadata=SimpleNamespace(name="team-a", labels=labels, annotations=annotations),
        status=SimpleNamespace(phase="Active"),
    )


def controller(
    status: int | None = None, config: InjectorConfig = CONFIG
) -> tuple[NamespaceController, list[tuple[str, ...]]]:
    made = NamespaceController(object(), config)
    core = FakeCore()
    made._core, made._rbac = core, FakeRbac(core.calls, status)  # type: ignore[assignment]
    return made, core.calls


SOURCES = [{"metadata": {"name": SECRET}, "type": "Opaque", "data": {}}]
LEGACY = f"rolebinding/{LEGACY_ROLE_BINDING},secret/{SECRET}"


@pytest.mark.parametrize("status", [None, 404])
async def test_an_opted_in_namespace_loses_its_legacy_role_binding_and_its_record_of_it(
    status: int | None,
) -> None:
    """Deleted first (404: already gone), then the record is rewritten without it."""
    made, calls = controller(status)
    with capture_logs() as logs:
        await made.reconcile(namespace(OPT_IN, LEGACY), SOURCES)
    assert calls == [
        ("delete", f"rolebinding/{LEGACY_ROLE_BINDING}", "team-a"),
        ("apply", f"secret/{SECRET}", "team-a"),
        ("record", "team-a", f"secret/{SECRET}"),
    ]
    assert "namespace.legacy_rbac_deleted" in [e["event"] for e in logs]


async def test_a_namespace_without_a_legacy_role_binding_gets_only_its_secret() -> None:
    made, calls = controller()
    await made.reconcile(namespace(OPT_IN, f"secret/{SECRET}"), SOURCES)
    assert calls == [
        ("apply", f"secret/{SECRET}", "team-a"),
        ("record", "team-a", f"secret/{SECRET}"),
    ]


async def test_a_failed_delete_keeps_the_record_for_the_next_reconcile() -> None:
    made, calls = controller(status=500)
    with pytest.raises(ApiException):
        await made.reconcile(namespace(OPT_IN, LEGACY), SOURCES)
    assert [c for c in calls if c[0] == "record"] == []


async def test_an_opted_out_namespace_loses_all_it_was_given() -> None:
    made, calls = controller()
    await made.reconcile(namespace({}, LEGACY), SOURCES)
    assert calls == [
        ("delete", f"rolebinding/{LEGACY_ROLE_BINDING}", "team-a"),
        ("delete", f"secret/{SECRET}", "team-a"),
        ("record", "team-a", "None"),
    ]


async def test_a_role_binding_under_another_name_is_named_in_a_warning() -> None:
    made, calls = controller()
    with capture_logs() as logs:
        await made.reconcile(namespace(OPT_IN, f"rolebinding/mine,secret/{SECRET}"), SOURCES)
    assert [c for c in calls if c[0] == "delete"] == []
    (warning,) = [e for e in logs if e["event"] == "namespace.legacy_rbac_left"]
    assert warning["rolebindings"] == ["mine"]
    assert ("record", "team-a", f"secret/{SECRET}") in calls


# --- volumes per namespace ------------------------------------------------------------------

TENANTS = InjectorConfig.model_validate(
    {
        "juicefs": {
            "allowedVolumes": ["models", "team-a", "team-b"],
            "volumeNamespaces": {"team-a": ["team-a"], "team-b": ["team-b", "team-b-canary"]},
        }
    }
)
TEAM_A = "juicefs-team-a-credentials"
TEAM_B = "juicefs-team-b-credentials"
ALL_SOURCES = [
    {"metadata": {"name": name}, "type": "Opaque", "data": {}} for name in (SECRET, TEAM_A, TEAM_B)
]


def test_a_namespace_is_named_only_its_volumes_credentials() -> None:
    assert credential_secret_names(TENANTS, "team-a") == [SECRET, TEAM_A]
    assert credential_secret_names(TENANTS, "team-b-canary") == [SECRET, TEAM_B]
    assert credential_secret_names(TENANTS, "elsewhere") == [SECRET]
    assert credential_secret_names(TENANTS) == [SECRET, TEAM_A, TEAM_B]


def test_a_copy_whose_volume_was_taken_away_is_unassigned() -> None:
    recorded = f"secret/{SECRET},secret/{TEAM_B},rolebinding/{LEGACY_ROLE_BINDING}"
    assert unassigned_secrets(recorded, [SECRET, TEAM_A]) == (TEAM_B,)
    assert unassigned_secrets(None, [SECRET]) == ()


async def test_another_tenants_credentials_are_never_applied() -> None:
    made, calls = controller(config=TENANTS)
    await made.reconcile(namespace(OPT_IN, None), ALL_SOURCES)
    assert calls == [
        ("apply", f"secret/{SECRET}", "team-a"),
        ("apply", f"secret/{TEAM_A}", "team-a"),
        ("record", "team-a", f"secret/{SECRET},secret/{TEAM_A}"),
    ]


async def test_a_withdrawn_volume_s_copy_is_deleted_and_dropped_from_the_record() -> None:
    made, calls = controller(config=TENANTS)
    with capture_logs() as logs:
        await made.reconcile(namespace(OPT_IN, f"secret/{SECRET},secret/{TEAM_B}"), ALL_SOURCES)
    assert calls[0] == ("delete", f"secret/{TEAM_B}", "team-a")
    assert calls[-1] == ("record", "team-a", f"secret/{SECRET},secret/{TEAM_A}")
    assert "namespace.credentials_withdrawn" in [e["event"] for e in logs]
