"""Answers for replicas of one pod template: decided once, identical but for the uid."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from injector.admission import parse_review, review
from injector.config import InjectorConfig
from injector.review_cache import MAX_PATCH_CHARS, ReviewCache, review_key
from injector.server import REVIEWS
from tests.helpers import bento_pod
from tests.kit.server import client_context, review_body, server_config, start


def body_with(uid: str, pod: dict[str, Any] | None = None) -> bytes:
    return review_body(pod or bento_pod(), request={"uid": uid})


def test_replicas_share_an_answer_with_their_own_uid() -> None:
    cache, config = ReviewCache(), InjectorConfig()
    first, second = body_with("uid-one"), body_with("uid-two")
    key, found = cache.get(first, parse_review(first).request)
    assert found is None
    cache.put(key, cache.answer(review(parse_review(first).request, config)))
    request = parse_review(second).request
    _, hit = cache.get(second, request)
    assert hit is not None
    assert cache.hits == 1
    fresh = review(request, config)
    assert json.loads(hit.body("uid-two")) == fresh.response  # as if decided again
    assert (hit.outcome, hit.reason, hit.operations) == (
        fresh.outcome,
        fresh.reason,
        len(fresh.ops),
    )
    assert json.loads(hit.body('we"ird\\')) == {  # any uid, JSON-escaped
        **fresh.response,
        "response": {**fresh.response["response"], "uid": 'we"ird\\'},
    }


def test_other_pods_and_ambiguous_uids_are_not_shared() -> None:
    pod = bento_pod()
    other = bento_pod()
    other["metadata"]["labels"]["team"] = "b"
    assert review_key(body_with("u-1", pod), "u-1") != review_key(body_with("u-2", other), "u-2")
    # The uid written twice (here also as a label value): never cached.
    pod["metadata"]["labels"]["copy"] = "u-3"
    assert review_key(body_with("u-3", pod), "u-3") is None
    # Written escaped, so not found literally: never cached.
    escaped = body_with("u-4").replace(b'"u-4"', b'"\\u0075-4"')
    assert parse_review(escaped).request.uid == "u-4"
    assert review_key(escaped, "u-4") is None


def test_the_cache_is_bounded() -> None:
    cache, config = ReviewCache(size=2), InjectorConfig()
    bodies = []
    for i in range(3):
        pod = bento_pod()
        pod["metadata"]["labels"]["n"] = str(i)
        bodies.append(body_with(f"uid-{i}", pod))
    for body in bodies:
        key, _ = cache.get(body, parse_review(body).request)
        cache.put(key, cache.answer(review(parse_review(body).request, config)))
    assert len(cache._answers) == 2
    assert cache.get(bodies[0], parse_review(bodies[0]).request)[1] is None
    result = review(parse_review(bodies[1]).request, config)
    patch = "x" * (MAX_PATCH_CHARS + 1)
    big = {**result.response, "response": {**result.response["response"], "patch": patch}}
    small = ReviewCache()
    small.put(b"k", small.answer(replace(result, response=big)))
    assert not small._answers


async def test_the_server_answers_replicas_from_the_cache(tmp_path: Path) -> None:
    runner, app, port = await start(server_config(tmp_path))
    connector = aiohttp.TCPConnector(ssl=client_context(tmp_path / "certs" / "ca.crt"))
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            answers = []
            for uid in ("replica-a", "replica-b"):
                async with session.post(
                    f"https://127.0.0.1:{port}/mutate",
                    data=body_with(uid),
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    assert resp.status == 200
                    answers.append(json.loads(await resp.read())["response"])
    finally:
        await runner.cleanup()
    assert app[REVIEWS].hits == 1
    assert [a.pop("uid") for a in answers] == ["replica-a", "replica-b"]
    assert answers[0] == answers[1]
    assert answers[0]["patch"]
