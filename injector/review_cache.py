"""Answers already given, for AdmissionReviews that differ only in their uid.

The replicas of one Deployment or Job reach the webhook as the same pod (the
apiserver names a generated pod after admission), each in its own
AdmissionReview with a new `request.uid`; `review()` is a pure function of
the request and the config, so their answers differ only in
`response.uid`. A scale-up to N replicas is then decided once.

The key is the body with its one literal occurrence of the request's uid cut
out (position and the bytes either side, hashed). Two bodies with the same
key are the same text but for that one occurrence; since it is the only
place the uid is written, it is the request's `uid` (a body whose uid is
written escaped, or occurs more than once, is not cached), so everything
`review()` reads is equal.

An answer is kept as the encoded response split around its uid, and what
the log line says: strings and bytes, which the garbage collector never
scans (caching the decoded dicts made every collection longer and parsing
the next 70 KB pod 30% slower). The cache keeps `size` answers, least
recently used out first, each with a patch of at most `MAX_PATCH_CHARS`.

Reviews of large bodies are decided in worker threads while the event loop
decides small ones, so the cache is shared between threads: a lock covers
each lookup and each insertion (a lookup's move to the end could otherwise
meet another thread's eviction of that key); hashing the body stays outside.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from pydantic_core import to_json

from injector.admission import AdmissionRequest, Outcome, ReviewResult

MAX_PATCH_CHARS = 64 * 1024


def review_key(body: bytes, uid: str) -> bytes | None:
    """The cache key of body, or None when its uid is not written exactly once, literally."""
    needle = uid.encode()
    position = body.find(needle)
    if position < 0 or body.find(needle, position + 1) >= 0:
        return None
    # sha256: hardware-accelerated here, twice as fast as blake2b on big bodies.
    digest = hashlib.sha256(position.to_bytes(8, "big"))
    digest.update(memoryview(body)[:position])
    digest.update(memoryview(body)[position + len(needle) :])
    return digest.digest()


@dataclass(frozen=True, slots=True)
class Answer:
    """One decision, encoded: the response body for any uid, and what to log about it."""

    outcome: Outcome
    reason: str
    operations: int
    warnings: tuple[str, ...]
    patch_chars: int
    before_uid: bytes
    after_uid: bytes

    def body(self, uid: str) -> bytes:
        """The AdmissionReview response answering the request with this uid (JSON)."""
        return self.before_uid + to_json(uid)[1:-1] + self.after_uid


def encode(result: ReviewResult, marker: str) -> Answer:
    """result as an Answer; marker must not occur in the response otherwise."""
    envelope = result.response
    inner = envelope["response"]
    text = to_json({**envelope, "response": {**inner, "uid": marker}})
    before, found, after = text.partition(marker.encode())
    if not found or marker.encode() in after:
        raise ValueError("the uid marker occurs in the response")
    return Answer(
        outcome=result.outcome,
        reason=result.reason,
        operations=len(result.ops),
        warnings=tuple(result.warnings),
        patch_chars=len(inner.get("patch", "")),
        before_uid=before,
        after_uid=after,
    )


class ReviewCache:
    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.hits = 0
        self._answers: OrderedDict[bytes, Answer] = OrderedDict()
        # Where the uid goes in an encoded response; random, so no pod can contain it.
        self._marker = "uid-" + secrets.token_hex(16)
        self._lock = threading.Lock()

    def get(self, body: bytes, request: AdmissionRequest) -> tuple[bytes | None, Answer | None]:
        """(key, the answer) or (key, None) if not seen yet; key None: not cacheable."""
        key = review_key(body, request.uid)
        if key is None:
            return None, None
        with self._lock:
            found = self._answers.get(key)
            if found is not None:
                self._answers.move_to_end(key)
                self.hits += 1
        return key, found

    def answer(self, result: ReviewResult) -> Answer:
        return encode(result, self._marker)

    def put(self, key: bytes | None, answer: Answer) -> None:
        if key is None or self.size <= 0 or answer.patch_chars > MAX_PATCH_CHARS:
            return
        with self._lock:
            self._answers[key] = answer
            self._answers.move_to_end(key)
            while len(self._answers) > self.size:
                self._answers.popitem(last=False)
