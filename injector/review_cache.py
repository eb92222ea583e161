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
`review()` reads is equal. The cache keeps `size` answers, least recently
used out first, each with a patch of at most `MAX_PATCH_CHARS` (a pod whose
patch would carry big parts of itself is decided every time).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from injector.admission import AdmissionRequest, ReviewResult

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


def with_uid(result: ReviewResult, uid: str) -> ReviewResult:
    """result, answering the request with this uid."""
    envelope: dict[str, Any] = result.response
    response = {**envelope, "response": {**envelope["response"], "uid": uid}}
    return ReviewResult(result.outcome, result.reason, response, result.ops, result.warnings)


class ReviewCache:
    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._answers: OrderedDict[bytes, ReviewResult] = OrderedDict()
        self.hits = 0

    def get(
        self, body: bytes, request: AdmissionRequest
    ) -> tuple[bytes | None, ReviewResult | None]:
        """(key, the answer for this request), or (key, None) if not seen (key None: never)."""
        key = review_key(body, request.uid)
        if key is None:
            return None, None
        found = self._answers.get(key)
        if found is None:
            return key, None
        self._answers.move_to_end(key)
        self.hits += 1
        return key, with_uid(found, request.uid)

    def put(self, key: bytes | None, result: ReviewResult) -> None:
        if key is None or self.size <= 0:
            return
        if len(result.response["response"].get("patch", "")) > MAX_PATCH_CHARS:
            return
        self._answers[key] = result
        self._answers.move_to_end(key)
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)
