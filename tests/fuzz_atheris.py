"""atheris on the bytes of an AdmissionReview: `python -m tests.fuzz_atheris RUNS CORPUS_DIR`.

Coverage-guided (libFuzzer): the injector's and common's code is
instrumented as it is imported, so this module imports them only inside
`atheris.instrument_imports()`. The corpus starts from the golden pods as
reviews; each input goes the server's way without HTTP
(`tests.fuzzing.check_body`: parse, the replica cache, review, encode) and
must meet the same invariants. `python -m tests.fuzzing` runs it when
atheris is installed. atheris.Fuzz() exits the process when done (status 0),
or on a crash with the input and its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]

with atheris.instrument_imports(include=["injector", "common"]):
    from injector.review_cache import ReviewCache
    from tests import fuzzing


def main() -> None:
    runs, corpus = int(sys.argv[1]), Path(sys.argv[2])
    fuzzing.quiet_logs()
    fuzzing.atheris_seeds(corpus)
    cache = ReviewCache(size=64)

    def one(data: bytes) -> None:
        fuzzing.check_body(data, fuzzing.DEFAULT, cache)

    atheris.Setup(
        [sys.argv[0], f"-runs={runs}", "-max_len=16384", "-print_final_stats=1", str(corpus)], one
    )
    atheris.Fuzz()


if __name__ == "__main__":
    main()
