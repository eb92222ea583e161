"""The agent's caches (nodeagent.informer): one LIST, then watches; what each event does;
when it relists; and that a reconcile reads workloads from the cache, against a fake
list and watch (no API server)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from kubernetes_asyncio import client

from injector.config import InjectorConfig
from nodeagent.informer import (
    GONE,
    Informer,
    Next,
    Page,
    WatchError,
    after_watch,
    relist_changed,
    split_lines,
    update,
)
from nodeagent.kube import AgentApi, namespace_labels, new_spec
from nodeagent.workloads import (
    node_workloads,
    slim_workload,
    template_fits_node,
    workload_bento,
)
from tests.helpers import bento_pod


def deployment(name: str = "llama", namespace: str = "serving") -> dict[str, Any]:
    """A Bento Deployment named name-v1, its template the kit's Bento pod."""
    pod = bento_pod()
    pod["metadata"]["labels"]["yatai.ai/bento-repository"] = name
    return {
        "metadata": {
            "name": f"{name}-v1",
            "namespace": namespace,
            "generation": 1,
            "creationTimestamp": "2026-11-28T00:00:00Z",
            "managedFields": [
                {"manager": "helm", "time": "2026-11-29T10:00:00Z"},
                {"manager": "kcm", "subresource": "status", "time": "2026-11-29T11:59:00Z"},
            ],
        },
        "spec": {"template": {"metadata": pod["metadata"], "spec": pod["spec"]}},
        "status": {"replicas": 0, "observedGeneration": 1},
    }


def a_node(labels: dict[str, str], taints: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "gpu-1", "labels": labels}, "spec": {"taints": taints or []}}


def obj(uid: str, generation: int = 1, version: str = "1", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {
            "uid": uid,
            "name": uid,
            "namespace": "serving",
            "generation": generation,
            "resourceVersion": version,
            "labels": labels,
        }
    }


def gen(o: dict[str, Any]) -> int:
    return int(o["metadata"]["generation"])


def event(kind: str, o: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": o}


def bookmark(version: str) -> dict[str, Any]:
    return event("BOOKMARK", {"metadata": {"resourceVersion": version}})


# What one watch event does (pure).


def test_an_added_or_deleted_object_changes_things_a_status_update_does_not() -> None:
    items = {"a": obj("a", 1)}
    added = update(items, event("ADDED", obj("b", 1, "7")), slim_workload, new_spec)
    assert (added.uid, added.changed, added.resource_version) == ("b", True, "7")
    status = update(items, event("MODIFIED", obj("a", 1, "8")), slim_workload, new_spec)
    assert status.value is not None
    assert not status.changed
    spec = update(items, event("MODIFIED", obj("a", 2, "9")), slim_workload, new_spec)
    assert spec.changed
    deleted = update(items, event("DELETED", obj("a", 2, "10")), slim_workload, new_spec)
    assert (deleted.uid, deleted.value, deleted.changed) == ("a", None, True)
    unknown = update(items, event("DELETED", obj("zz")), slim_workload, new_spec)
    assert not unknown.changed


def test_a_bookmark_moves_the_resource_version_only() -> None:
    step = update({}, bookmark("42"), slim_workload, new_spec)
    assert (step.uid, step.value, step.changed, step.resource_version) == ("", None, False, "42")


def test_an_error_event_is_raised_with_its_code() -> None:
    gone = event("ERROR", {"code": 410, "message": "too old resource version: 1 (99)"})
    with pytest.raises(WatchError) as raised:
        update({}, gone, slim_workload, new_spec)
    assert raised.value.code == GONE
    with pytest.raises(WatchError):
        update({}, event("SURPRISE", obj("a")), slim_workload, new_spec)


def test_only_a_failed_watch_relists() -> None:
    assert after_watch(None, 300) == Next(relist=False, delay=0.0)  # the server's timeout
    assert after_watch(None, 0.25) == Next(relist=False, delay=0.75)  # ended at once: a pause
    assert after_watch(WatchError(GONE, "too old"), 1, 5) == Next(relist=True, delay=0.0)
    assert after_watch(WatchError(500, "etcd"), 1, 5) == Next(relist=True, delay=5)
    assert after_watch(OSError("reset"), 1, 5) == Next(relist=True, delay=5)


def test_a_relist_changed_things_only_when_objects_or_their_specs_differ() -> None:
    before = {"a": obj("a", 1), "b": obj("b", 3)}
    assert not relist_changed(before, {"b": obj("b", 3, "9"), "a": obj("a", 1)}, new_spec)
    assert relist_changed(before, {"a": obj("a", 1)}, new_spec)
    assert relist_changed(before, {**before, "c": obj("c")}, new_spec)
    assert relist_changed(before, {"a": obj("a", 2), "b": obj("b", 3)}, new_spec)


def test_watch_lines_split_across_chunks() -> None:
    lines, rest = split_lines(b"", b'{"a":1}\n{"b"')
    assert (lines, rest) == ([b'{"a":1}'], b'{"b"')
    lines, rest = split_lines(rest, b":2}\n\n")
    assert (lines, rest) == ([b'{"b":2}'], b"")
    assert split_lines(b"x" * 300_000, b"") == ([], b"x" * 300_000)  # no line limit


# What the cache keeps of a workload: enough for every decision, and no more.


def test_the_slim_workload_decides_as_the_whole_object() -> None:
    config = InjectorConfig()
    full = deployment()
    full["metadata"]["managedFields"].append({"manager": "kubectl", "time": "2026-11-29T11:00:00Z"})
    full["metadata"]["generation"] = 4
    full["spec"]["replicas"] = 0
    template = full["spec"]["template"]
    template["spec"]["nodeSelector"] = {"pool": "a100"}
    template["spec"]["tolerations"] = [{"key": "gpu", "operator": "Exists"}]
    template["spec"]["affinity"] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        },
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []},
    }
    template["spec"]["containers"][0]["env"] = [{"name": f"E{i}", "value": "x"} for i in range(50)]
    slim = slim_workload(copy.deepcopy(full))
    assert workload_bento(slim, "Deployment", config) == workload_bento(full, "Deployment", config)
    taint = [{"key": "gpu", "value": "1", "effect": "NoSchedule"}]
    for node in (
        a_node({"pool": "a100", "zone": "a"}, taints=taint),
        a_node({"pool": "a100", "zone": "b"}),
        a_node({"pool": "l4", "zone": "a"}),
        a_node({"pool": "a100", "zone": "a"}, taints=[{**taint[0], "key": "other"}]),
    ):
        assert template_fits_node(slim["spec"]["template"], node) == template_fits_node(
            template, node
        )
    assert "containers" not in slim["spec"]["template"]["spec"]
    assert len(repr(slim)) < len(repr(full)) / 3


def test_node_workloads_keeps_opted_in_namespaces_and_placeable_templates() -> None:
    config = InjectorConfig()
    here = deployment("llama", namespace="serving")
    elsewhere = deployment("mistral", namespace="other")
    pinned = deployment("qwen", namespace="serving")
    pinned["spec"]["template"]["spec"]["nodeSelector"] = {"pool": "l4"}
    found, ignored = node_workloads(
        [("Deployment", slim_workload(o)) for o in (here, elsewhere, pinned)],
        {"serving"},
        config,
        a_node({"pool": "a100"}),
    )
    assert [str(w) for w in found] == ["Deployment serving/llama-v1"]
    assert ignored == []


# The informer against a fake API: pages, watches, relists.


class FakeApi:
    """Serves `objects` in pages of `page_size`; each watch plays the next script (a list of
    events, or an exception to raise after them), then waits for ever once none is left."""

    def __init__(self, objects: list[dict[str, Any]], page_size: int = 2) -> None:
        self.objects = objects
        self.page_size = page_size
        self.version = "100"
        self.scripts: list[tuple[list[dict[str, Any]], Exception | None]] = []
        self.list_tokens: list[str] = []
        self.watched_from: list[str] = []
        self.idle = asyncio.Event()
        # Each watch plays its script once this is set (a test changes the objects first).
        self.go = asyncio.Event()
        self.go.set()

    async def list_page(self, token: str) -> Page:
        self.list_tokens.append(token)
        start = int(token or 0)
        end = start + self.page_size
        more = str(end) if end < len(self.objects) else ""
        return Page(copy.deepcopy(self.objects[start:end]), self.version, more)

    async def watch_from(self, version: str) -> AsyncGenerator[dict[str, Any], None]:
        self.watched_from.append(version)
        if not self.scripts:
            self.idle.set()
            await asyncio.Event().wait()
        await self.go.wait()
        events, error = self.scripts.pop(0)
        for e in events:
            yield e
        if error is not None:
            raise error


async def run_until_idle(informer: Informer[Any], api: FakeApi) -> None:
    task = asyncio.create_task(informer.run())
    try:
        async with asyncio.timeout(5):
            await api.idle.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def informer_of(api: FakeApi) -> tuple[Informer[dict[str, Any]], list[str]]:
    informer = Informer("deployments", api.list_page, api.watch_from, slim_workload, new_spec, 0.01)
    calls: list[str] = []
    informer.changed = lambda: calls.append(informer.resource_version)
    return informer, calls


async def test_one_paginated_list_then_watches_from_the_last_version_seen() -> None:
    api = FakeApi([obj(f"d{i}") for i in range(5)])
    api.scripts = [
        ([event("MODIFIED", obj("d1", 1, "101")), bookmark("150")], None),  # server timeout
        ([event("ADDED", obj("d9", 1, "160")), event("MODIFIED", obj("d2", 2, "161"))], None),
        ([event("DELETED", obj("d0", 1, "170"))], None),
    ]
    informer, calls = informer_of(api)
    await run_until_idle(informer, api)
    assert api.list_tokens == ["", "2", "4"]  # one LIST, in three pages; never again
    assert api.watched_from == ["100", "150", "161", "170"]
    assert informer.synced.is_set()
    assert calls == ["160", "161", "170"]  # added, new spec, deleted: not the status update
    assert sorted(informer.items) == ["d1", "d2", "d3", "d4", "d9"]
    assert informer.items["d2"]["metadata"]["generation"] == 2


async def test_410_gone_relists_at_once_and_reports_what_the_watch_missed() -> None:
    api = FakeApi([obj("a"), obj("b")])
    gone = event("ERROR", {"code": 410, "message": "too old resource version"})
    api.scripts = [([gone], None)]
    api.go.clear()
    informer, calls = informer_of(api)
    task = asyncio.create_task(informer.run())
    await asyncio.wait_for(informer.synced.wait(), 5)
    # Meanwhile b got a new spec and c was created: only a relist can tell.
    api.objects = [obj("a"), obj("b", 2), obj("c")]
    api.version = "300"
    api.go.set()
    async with asyncio.timeout(5):
        await api.idle.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert api.list_tokens == ["", "", "2"]
    assert api.watched_from == ["100", "300"]
    assert calls == ["300"]
    assert sorted(informer.items) == ["a", "b", "c"]


async def test_an_error_relists_after_a_pause_and_an_unchanged_relist_is_quiet() -> None:
    api = FakeApi([obj("a")])
    api.scripts = [([], OSError("connection reset"))]
    informer, calls = informer_of(api)
    await run_until_idle(informer, api)
    assert api.list_tokens == ["", ""]
    assert api.watched_from == ["100", "100"]
    assert calls == []


async def test_a_failed_list_is_tried_again() -> None:
    api = FakeApi([obj("a")])
    real = api.list_page
    failures = [WatchError(500, "etcd timeout")]

    async def flaky(token: str) -> Page:
        if failures:
            raise failures.pop()
        return await real(token)

    informer = Informer("deployments", flaky, api.watch_from, slim_workload, new_spec, 0.01)
    await run_until_idle(informer, api)
    assert informer.synced.is_set()
    assert list(informer.items) == ["a"]


# The reconcile reads the cache: no API call for workloads.


async def test_agent_workloads_come_from_the_caches() -> None:
    async with client.ApiClient() as api_client:
        # No server behind it: any request would fail.
        api_client.configuration.host = "http://127.0.0.1:9"
        api = AgentApi(api_client, "gpu-1", "agent-x")
        serving = {"metadata": {"uid": "ns1", "name": "serving", "labels": {}}}
        config = InjectorConfig()
        serving["metadata"]["labels"] = {
            config.labels.namespace_opt_in: config.labels.namespace_opt_in_value
        }
        other = {"metadata": {"uid": "ns2", "name": "other"}}
        for ns in (serving, other):
            api.namespaces.apply(event("ADDED", ns))
        for i, o in enumerate((deployment("llama"), deployment("qwen", namespace="other"))):
            o["metadata"]["uid"] = f"d{i}"
            api.deployments.apply(event("ADDED", o))
        with pytest.raises(TimeoutError):  # not synced yet: the pass waits, then fails
            async with asyncio.timeout(0.05):
                await api.workloads(config, a_node({}))
        for informer in (api.namespaces, api.deployments, api.statefulsets):
            informer.synced.set()
        found = await api.workloads(config, a_node({}))
        assert [str(w) for w in found] == ["Deployment serving/llama-v1"]
        assert namespace_labels(other) == ("other", {})
