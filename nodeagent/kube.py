"""The agent's API calls: the workloads of opted-in namespaces, its own Node, Events on it.

It reads namespaces, Deployments and StatefulSets cluster-wide, and writes
only its own Node's warm labels and record annotation (a
ValidatingAdmissionPolicy holds its service account to exactly that) and
Events about its Node in `default`, where `kubectl describe node` finds them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

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
from nodeagent.plan import generations_changed, spec_changed
from nodeagent.servedpods import ServedPod
from nodeagent.workloads import Workload, template_fits_node, workload_bento

log = structlog.get_logger("nodeagent.kube")

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
# The Events the agent posts for a pod's sidecar name it as their source.
SIDECAR_COMPONENT = "juicefs-mount"
TIMEOUT: dict[str, Any] = {"_request_timeout": 30}
# How long one watch request lasts before the agent relists (the server ends it then).
WATCH_SECONDS = 300
WATCH_RETRY_SECONDS = 5
# The pods on its node are relisted this often, whatever the watch said: a
# sidecar waits for its socket until the agent has seen its pod (an e2e run
# saw a new pod's events missed for minutes), and one field-selected list of
# one node's pods is cheap.
POD_WATCH_SECONDS = 30
API_ERRORS = (client.exceptions.ApiException, OSError, TimeoutError, aiohttp.ClientError)


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

    def _json(self, obj: Any) -> dict[str, Any]:
        return cast(dict[str, Any], self._api.sanitize_for_serialization(obj))

    async def node(self) -> dict[str, Any]:
        return self._json(await self._core.read_node(self.node_name, **TIMEOUT))

    async def workloads(self, config: InjectorConfig, node: Mapping[str, Any]) -> list[Workload]:
        """The node-cache Bento workloads of opted-in namespaces that may run on this node."""
        namespaces = await self._core.list_namespace(**TIMEOUT)
        chosen = {
            ns.metadata.name
            for ns in namespaces.items
            if opted_in(ns.metadata.name, ns.metadata.labels, config)
        }
        found: list[Workload] = []
        listings = (
            ("Deployment", self._apps.list_deployment_for_all_namespaces),
            ("StatefulSet", self._apps.list_stateful_set_for_all_namespaces),
        )
        for kind, list_all in listings:
            listed = await list_all(**TIMEOUT)
            for item in listed.items:
                if item.metadata.namespace not in chosen:
                    continue
                obj = self._json(item)
                template = (obj.get("spec") or {}).get("template") or {}
                if not template_fits_node(template, node):
                    continue
                result = workload_bento(obj, kind, config)
                if isinstance(result, Workload):
                    found.append(result)
                else:
                    log.debug("workload.ignored", reason=result)
        return found

    async def watch_workloads(self, changed: Callable[[], None]) -> None:
        """Call changed() whenever a Deployment or StatefulSet anywhere is added, deleted or
        given a new spec, until cancelled: the agent then reconciles at once rather than at
        its next resync. Which of them matter is the reconcile's business, not the watch's."""
        await asyncio.gather(
            self._watch(self._apps.list_deployment_for_all_namespaces, changed),
            self._watch(self._apps.list_stateful_set_for_all_namespaces, changed),
        )

    async def _watch(
        self, list_all: Callable[..., Awaitable[Any]], changed: Callable[[], None]
    ) -> None:
        seen: dict[str, int | None] | None = None
        while True:
            try:
                listed = await list_all(**TIMEOUT)
                relisted = {i.metadata.uid: i.metadata.generation for i in listed.items}
                if seen is not None and generations_changed(seen, relisted):
                    changed()
                seen = relisted
                stream = watch.Watch()
                async with stream:
                    async for event in stream.stream(
                        list_all,
                        resource_version=listed.metadata.resource_version,
                        timeout_seconds=WATCH_SECONDS,
                        # The client gives up a little after the server would.
                        _request_timeout=WATCH_SECONDS + 30,
                    ):
                        meta = event["object"].metadata
                        if spec_changed(event["type"], seen.get(meta.uid), meta.generation):
                            changed()
                        if event["type"] == "DELETED":
                            seen.pop(meta.uid, None)
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            seen[meta.uid] = meta.generation
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the resync still runs; try the watch again
                log.warning("workloads.watch_error", error=describe_error(err))
                await asyncio.sleep(WATCH_RETRY_SECONDS)

    async def record(
        self, current_labels: Mapping[str, str], wanted_labels: Mapping[str, str], record: str
    ) -> None:
        body = node_patch(current_labels, wanted_labels, record)
        options: dict[str, Any] = {"_content_type": MERGE, **TIMEOUT}
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
