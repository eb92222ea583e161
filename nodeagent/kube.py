"""The agent's API calls: the workloads of opted-in namespaces, its own Node, Events on it.

It reads namespaces, Deployments and StatefulSets cluster-wide, through one
cache each (nodeagent.informer: one LIST at start, then a watch), and writes
only its own Node's warm labels and record annotation (a
ValidatingAdmissionPolicy holds its service account to exactly that) and
Events about its Node in `default`, where `kubectl describe node` finds them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

import aiohttp
import structlog
from kubernetes_asyncio import client, watch

from common.kubeevents import (
    EventSeries,
    condition_patch,
    event_body,
    pod_involved,
    repeat_patch,
)
from common.warm import AGENT_COMPONENT, NODE_EVENTS_NAMESPACE, WARM_ANNOTATION, is_warm_label
from injector.config import InjectorConfig
from injector.namespaces import describe_error, opted_in
from nodeagent.informer import (
    PAGE_SIZE,
    Informer,
    ListPage,
    Page,
    WatchError,
    WatchFrom,
    split_lines,
)
from nodeagent.plan import spec_changed
from nodeagent.servedpods import ServedPod
from nodeagent.workloads import Workload, generation, node_workloads, slim_workload

log = structlog.get_logger("nodeagent.kube")

V = TypeVar("V")

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
# The Events the agent posts for a pod's sidecar name it as their source.
SIDECAR_COMPONENT = "juicefs-mount"
TIMEOUT: dict[str, Any] = {"_request_timeout": 30}
# How long one watch request of the workloads lasts (the server ends it then, and the
# agent watches again from the last resourceVersion it saw: no relist).
WATCH_SECONDS = 300
# How long a pass waits for the first lists of namespaces and workloads.
SYNC_SECONDS = 60
WATCH_RETRY_SECONDS = 5
# The pods on its node are relisted this often, whatever the watch said: a
# sidecar waits for its socket until the agent has seen its pod (an e2e run
# saw a new pod's events missed for minutes), and one field-selected list of
# one node's pods is cheap.
POD_WATCH_SECONDS = 30
API_ERRORS = (client.exceptions.ApiException, OSError, TimeoutError, aiohttp.ClientError)


def lister(list_all: Callable[..., Awaitable[Any]]) -> ListPage:
    """One page of list_all (a kubernetes_asyncio list call) as JSON.

    The body is parsed as plain JSON, never into the client's model classes:
    the agent keeps a sliver of each object, and building models of 500
    Deployments a page costs far more time and memory than the JSON.
    """

    async def list_page(token: str) -> Page:
        options: dict[str, Any] = {"limit": PAGE_SIZE, **TIMEOUT}
        if token:
            options["_continue"] = token
        response = await list_all(_preload_content=False, **options)
        try:
            body = await response.read()
        finally:
            response.release()
        if response.status != 200:
            # 410 here: the continue token expired (the list took minutes); relisted at once.
            raise WatchError(response.status, body[:500].decode(errors="replace"))
        listed = json.loads(body)
        meta = listed.get("metadata") or {}
        return Page(
            listed.get("items") or [],
            str(meta.get("resourceVersion") or ""),
            str(meta.get("continue") or ""),
        )

    return list_page


def watcher(list_all: Callable[..., Awaitable[Any]]) -> WatchFrom:
    """A watch through list_all from a resourceVersion, its events as JSON, with bookmarks
    (so the resourceVersion to watch again from stays recent while nothing changes)."""

    async def watch_from(version: str) -> AsyncGenerator[dict[str, Any], None]:
        response = await list_all(
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            # The client gives up a little after the server would.
            _request_timeout=WATCH_SECONDS + 30,
            _preload_content=False,
        )
        try:
            if response.status != 200:
                body = await response.read()
                raise WatchError(response.status, body[:500].decode(errors="replace"))
            pending = b""
            async for chunk in response.content.iter_any():
                lines, pending = split_lines(pending, chunk)
                for line in lines:
                    yield json.loads(line)
        finally:
            response.release()

    return watch_from


def cache_of(
    resource: str,
    list_all: Callable[..., Awaitable[Any]],
    slim: Callable[[Mapping[str, Any]], V],
    differs: Callable[[V, V], bool],
) -> Informer[V]:
    """An Informer of the resource list_all lists, cluster-wide."""
    return Informer(resource, lister(list_all), watcher(list_all), slim, differs)


def namespace_labels(obj: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """What the agent keeps of a namespace: its name and labels (whether it is opted in)."""
    meta = obj.get("metadata") or {}
    return str(meta.get("name") or ""), dict(meta.get("labels") or {})


def _labels_differ(old: tuple[str, dict[str, str]], new: tuple[str, dict[str, str]]) -> bool:
    return old != new


def new_spec(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """A workload's spec changed: its generation moved (plan.spec_changed's rule)."""
    return spec_changed("MODIFIED", generation(old), generation(new))


def node_patch(
    current_labels: Mapping[str, str], wanted_labels: Mapping[str, str], record: str
) -> dict[str, Any]:
    """A merge patch: our warm labels to exactly wanted_labels, the record annotation to record."""
    labels: dict[str, str | None] = {
        key: None for key in current_labels if is_warm_label(key) and key not in wanted_labels
    }
    labels.update(
        {key: value for key, value in wanted_labels.items() if current_labels.get(key) != value}
    )
    return {"metadata": {"labels": labels, "annotations": {WARM_ANNOTATION: record}}}


class AgentApi:
    def __init__(self, api: client.ApiClient, node_name: str, pod_name: str) -> None:
        self._api = api
        self._core = client.CoreV1Api(api)
        self._apps = client.AppsV1Api(api)
        self.node_name = node_name
        self.pod_name = pod_name
        self.series = EventSeries()
        # What the agent keeps of every namespace and workload (nodeagent.informer).
        self.namespaces = cache_of(
            "namespaces", self._core.list_namespace, namespace_labels, _labels_differ
        )
        self.deployments = cache_of(
            "deployments", self._apps.list_deployment_for_all_namespaces, slim_workload, new_spec
        )
        self.statefulsets = cache_of(
            "statefulsets", self._apps.list_stateful_set_for_all_namespaces, slim_workload, new_spec
        )

    @property
    def _informers(self) -> tuple[Informer[Any], ...]:
        return (self.namespaces, self.deployments, self.statefulsets)

    def _json(self, obj: Any) -> dict[str, Any]:
        return cast(dict[str, Any], self._api.sanitize_for_serialization(obj))

    async def node(self) -> dict[str, Any]:
        return self._json(await self._core.read_node(self.node_name, **TIMEOUT))

    async def workloads(self, config: InjectorConfig, node: Mapping[str, Any]) -> list[Workload]:
        """The node-cache Bento workloads of opted-in namespaces that may run on this node,
        from the caches watch_workloads keeps: no API call, once they are synced (a pass
        before that waits up to SYNC_SECONDS for them, then fails as an API error would)."""
        async with asyncio.timeout(SYNC_SECONDS):
            for informer in self._informers:
                await informer.synced.wait()
        chosen = {
            name for name, labels in self.namespaces.values() if opted_in(name, labels, config)
        }
        cached = [
            *(("Deployment", obj) for obj in self.deployments.values()),
            *(("StatefulSet", obj) for obj in self.statefulsets.values()),
        ]
        found, ignored = node_workloads(cached, chosen, config, node)
        for reason in ignored:
            log.debug("workload.ignored", reason=reason)
        return found

    async def watch_workloads(self, changed: Callable[[], None]) -> None:
        """Keep the caches of namespaces, Deployments and StatefulSets (one LIST each, then
        watches), and call changed() whenever one is added, deleted or given a new spec
        (a namespace: new labels), until cancelled: the agent then reconciles at once
        rather than at its next resync. Which of them matter is the reconcile's business."""
        for informer in self._informers:
            informer.changed = changed
        await asyncio.gather(*(informer.run() for informer in self._informers))

    async def record(
        self, current_labels: Mapping[str, str], wanted_labels: Mapping[str, str], record: str
    ) -> None:
        body = node_patch(current_labels, wanted_labels, record)
        options: dict[str, Any] = {"_content_type": MERGE, **TIMEOUT}
        await self._core.patch_node(self.node_name, body, **options)

    async def remove_taint(self, index: int, key: str) -> None:
        """Remove our Node's index-th taint if its key is still `key`: the JSON patch's
        test fails (422) when the taints moved since they were read, and the next pass
        tries again on what it then reads."""
        path = f"/spec/taints/{index}"
        body = [{"op": "test", "path": f"{path}/key", "value": key}, {"op": "remove", "path": path}]
        options: dict[str, Any] = {"_content_type": JSON_PATCH, **TIMEOUT}
        await self._core.patch_node(self.node_name, body, **options)

    async def _post_event(
        self,
        namespace: str,
        involved: dict[str, Any],
        component: str,
        kind: str,
        reason: str,
        message: str,
    ) -> str:
        """An Event reported by this agent's pod on this node, its name; API_ERRORS pass up."""
        body = event_body(
            namespace=namespace,
            involved=involved,
            kind=kind,
            reason=reason,
            message=message,
            component=component,
            instance=self.pod_name,
            host=self.node_name,
        )
        await self._core.create_namespaced_event(namespace, cast(Any, body), **TIMEOUT)
        return str(body["metadata"]["name"])

    async def event(self, kind: str, reason: str, message: str) -> None:
        """An Event on our Node, or one more of the same (EventSeries); one that cannot be sent
        is logged and dropped."""
        key = (kind, reason, message)
        repeat = self.series.repeat(key)
        if repeat is not None:
            try:
                options: dict[str, Any] = {"_content_type": MERGE, **TIMEOUT}
                await self._core.patch_namespaced_event(
                    repeat.name, NODE_EVENTS_NAMESPACE, repeat_patch(repeat.count), **options
                )
                self.series.posted(key, repeat.name, repeat.count)
                return
            except client.exceptions.ApiException as err:
                if err.status != 404:
                    log.warning("event.dropped", reason=reason, error=describe_error(err))
                    return
                self.series.forget(key)  # its TTL passed: post it anew
            except API_ERRORS as err:
                log.warning("event.dropped", reason=reason, error=str(err) or type(err).__name__)
                return
        # A Node's Events name it by its name as uid, as the kubelet does.
        node = {"kind": "Node", "name": self.node_name, "uid": self.node_name}
        try:
            name = await self._post_event(
                NODE_EVENTS_NAMESPACE, node, AGENT_COMPONENT, kind, reason, message
            )
        except API_ERRORS as err:
            log.warning("event.dropped", reason=reason, error=str(err) or type(err).__name__)
            return
        self.series.posted(key, name)

    # The pods on this node whose unprivileged sidecars it mounts for (nodeagent.podmounts).

    async def pod_event(self, pod: ServedPod, kind: str, reason: str, message: str) -> None:
        """An Event on a served pod, as its sidecar asked; one that cannot be sent is dropped."""
        involved = pod_involved(pod.name, pod.namespace, pod.uid)
        try:
            await self._post_event(
                pod.namespace, involved, SIDECAR_COMPONENT, kind, reason, message
            )
        except API_ERRORS as err:
            log.warning("pod_event.dropped", pod=str(pod), reason=reason, error=describe_error(err))

    async def pod_condition(self, pod: ServedPod, status: str, reason: str, message: str) -> None:
        """The served pod's readiness condition (the pods fence policy holds us to that alone).

        The pod's uid is a precondition: a pod recreated under the same name
        is another pod, whose condition this is not.
        """
        body = condition_patch(pod.condition_type, status, reason, message)
        body["metadata"] = {"uid": pod.uid}
        options: dict[str, Any] = {"_content_type": STRATEGIC, **TIMEOUT}
        await self._core.patch_namespaced_pod_status(pod.name, pod.namespace, body, **options)
        log.info("pod.condition_set", pod=str(pod), status=status, reason=reason)

    async def pods_on_node(self) -> list[dict[str, Any]]:
        """Every pod bound to this node, as JSON."""
        listed = await self._core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node_name}", **TIMEOUT
        )
        return [self._json(item) for item in listed.items]

    async def watch_pods(
        self, seen: Callable[[dict[str, Any]], None], gone: Callable[[str], None]
    ) -> None:
        """Tell seen() of every JuiceFS Bento pod on this node as it is listed, added or
        changed, and gone() of each deleted (by uid), until cancelled."""
        selector = f"spec.nodeName={self.node_name}"
        known: set[str] = set()
        while True:
            try:
                listed = await self._core.list_pod_for_all_namespaces(
                    field_selector=selector, **TIMEOUT
                )
                current = {item.metadata.uid for item in listed.items}
                for uid in known - current:
                    gone(uid)
                known = current
                for item in listed.items:
                    seen(self._json(item))
                stream = watch.Watch()
                async with stream:
                    async for event in stream.stream(
                        self._core.list_pod_for_all_namespaces,
                        field_selector=selector,
                        resource_version=listed.metadata.resource_version,
                        timeout_seconds=POD_WATCH_SECONDS,
                        _request_timeout=POD_WATCH_SECONDS + 30,
                    ):
                        pod = self._json(event["object"])
                        uid = str((pod.get("metadata") or {}).get("uid") or "")
                        if event["type"] == "DELETED":
                            known.discard(uid)
                            gone(uid)
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            known.add(uid)
                            seen(pod)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # relist, then watch again
                log.warning("pods.watch_error", error=describe_error(err))
                await asyncio.sleep(WATCH_RETRY_SECONDS)
