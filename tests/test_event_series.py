"""Repeated Events count on the first one (common.kubeevents.EventSeries, the agent's Node)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kubernetes_asyncio import client

from common.kubeevents import EventSeries, Repeat, repeat_patch
from nodeagent.kube import AgentApi

KEY = ("Warning", "WarmFailed", "llama:v9 (models): no manifest")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_repeat_within_the_window_counts_on_the_first() -> None:
    clock = Clock()
    series = EventSeries(window=600, clock=clock)
    assert series.repeat(KEY) is None
    series.posted(KEY, "node-1.17f0")
    clock.now += 60
    assert series.repeat(KEY) == Repeat("node-1.17f0", 2)
    series.posted(KEY, "node-1.17f0", 2)
    clock.now += 60
    assert series.repeat(KEY) == Repeat("node-1.17f0", 3)
    # Another message is another Event.
    assert series.repeat((*KEY[:2], "llama:v9 (models): timed out")) is None


def test_a_repeat_after_the_window_or_once_forgotten_is_a_new_event() -> None:
    clock = Clock()
    series = EventSeries(window=600, clock=clock)
    series.posted(KEY, "node-1.17f0")
    clock.now += 601
    assert series.repeat(KEY) is None
    series.posted(KEY, "node-1.2a00")
    series.forget(KEY)
    assert series.repeat(KEY) is None


def test_the_series_remembers_a_bounded_number_of_events() -> None:
    series = EventSeries(keys=2, clock=Clock())
    for n in range(3):
        series.posted(("Warning", "WarmFailed", str(n)), f"e{n}")
    assert series.repeat(("Warning", "WarmFailed", "0")) is None
    assert series.repeat(("Warning", "WarmFailed", "2")) == Repeat("e2", 2)


def test_a_repeat_patch_counts_and_stamps() -> None:
    patch = repeat_patch(3)
    assert patch["count"] == 3
    assert patch["lastTimestamp"].endswith("Z")


class FakeCore:
    """CoreV1Api's two Event calls, recorded; a PATCH of a gone Event answers 404."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.gone: set[str] = set()

    async def create_namespaced_event(self, namespace: str, body: Any, **_: Any) -> None:
        self.calls.append(("create", body["metadata"]["name"]))

    async def patch_namespaced_event(
        self, name: str, namespace: str, body: Any, **options: Any
    ) -> None:
        if name in self.gone:
            raise client.exceptions.ApiException(status=404, reason="Not Found")
        assert options["_content_type"] == "application/merge-patch+json"
        self.calls.append(("patch", body["count"]))


@pytest.fixture
def agent_api() -> tuple[AgentApi, FakeCore]:
    api = AgentApi.__new__(AgentApi)  # no API client: _core is the fake
    core = FakeCore()
    api._core = core  # type: ignore[assignment]
    api.node_name, api.pod_name, api.series = "node-1", "agent-0", EventSeries()
    return api, core


def test_the_agent_posts_a_repeated_node_event_once_and_counts_it(
    agent_api: tuple[AgentApi, FakeCore],
) -> None:
    api, core = agent_api

    async def three_times() -> None:
        for _ in range(3):
            await api.event(*KEY)

    asyncio.run(three_times())
    assert [call[0] for call in core.calls] == ["create", "patch", "patch"]
    assert [call[1] for call in core.calls[1:]] == [2, 3]


def test_a_repeat_of_an_event_the_apiserver_dropped_is_posted_anew(
    agent_api: tuple[AgentApi, FakeCore],
) -> None:
    api, core = agent_api
    asyncio.run(api.event(*KEY))
    core.gone.add(core.calls[0][1])  # the Event's TTL passed
    asyncio.run(api.event(*KEY))
    assert [call[0] for call in core.calls] == ["create", "create"]
