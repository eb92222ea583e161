"""Floods, in process: where a review is decided, the overloaded answer's wait, the
config's bounds on both, and the cache of answers shared by threads.

The server side (429 past the bound, /healthz during a large review) runs
against `serve` itself in tests/test_server_limits.py.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest

from injector.admission import parse_review, review
from injector.backpressure import retry_after_seconds, where_to_decide
from injector.config import ConfigError, InjectorConfig, parse_config
from injector.review_cache import ReviewCache
from tests.helpers import bento_pod
from tests.kit.server import review_body


@pytest.mark.parametrize(
    ("size", "threshold", "where"),
    [
        (0, 64 * 1024, "inline"),
        (64 * 1024 - 1, 64 * 1024, "inline"),
        (64 * 1024, 64 * 1024, "worker"),
        (900 * 1024, 64 * 1024, "worker"),
        (0, 0, "worker"),  # 0: every review in a worker
        (616, 0, "worker"),
    ],
)
def test_large_bodies_are_decided_in_a_worker(size: int, threshold: int, where: str) -> None:
    assert where_to_decide(size, threshold) == where


@pytest.mark.parametrize(
    ("queue_seconds", "retry_after"),
    [(0.001, 1), (0.5, 1), (1.0, 1), (1.2, 2), (4.0, 4), (10.0, 10)],
)
def test_retry_after_is_the_queue_wait_in_whole_seconds(
    queue_seconds: float, retry_after: int
) -> None:
    assert retry_after_seconds(queue_seconds) == retry_after


def test_the_flood_defaults() -> None:
    server = InjectorConfig().server
    assert server.offload_body_bytes == 64 * 1024
    assert server.max_reviews_in_flight == 16
    assert server.review_queue_seconds == 1.0


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ({"maxReviewsInFlight": 0}, "server.maxReviewsInFlight"),
        ({"maxReviewsInFlight": 5000}, "server.maxReviewsInFlight"),
        ({"reviewQueueSeconds": 0}, "server.reviewQueueSeconds"),
        ({"reviewQueueSeconds": 11}, "server.reviewQueueSeconds"),
        ({"offloadBodyBytes": -1}, "server.offloadBodyBytes"),
        ({"reviewQueueSeconds": "soon"}, "server.reviewQueueSeconds"),
    ],
)
def test_bad_flood_settings_are_refused_naming_the_key(
    server: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_config({"server": server})


def test_the_webhook_timeout_is_no_config_key() -> None:
    """The apiserver's timeout is the webhook configuration's; the chart checks the queue
    wait against it (tests/test_chart.py)."""
    with pytest.raises(ConfigError, match=re.escape("webhook.timeoutSeconds was removed")):
        parse_config({"webhook": {"timeoutSeconds": 10}})
    config = parse_config({"server": {"reviewQueueSeconds": 9}})
    assert config.server.review_queue_seconds == 9


def test_the_cache_of_answers_is_safe_to_share_between_threads() -> None:
    """Lookups, insertions and evictions from four threads at once: no error, no lost answer."""
    config = InjectorConfig()
    bodies = [review_body(bento_pod(name=f"pod-{i}")) for i in range(8)]
    requests = [parse_review(body).request for body in bodies]
    cache = ReviewCache(size=3)  # smaller than the pods: every round evicts
    answers = [cache.answer(review(request, config)) for request in requests]
    failures: list[BaseException] = []

    def hammer(offset: int) -> None:
        try:
            for round_ in range(2000):
                index = (round_ + offset) % len(bodies)
                key, found = cache.get(bodies[index], requests[index])
                if found is None:
                    cache.put(key, answers[index])
                else:
                    assert found is answers[index]
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert len(cache._answers) == 3
