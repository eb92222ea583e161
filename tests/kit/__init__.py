"""The shared test kit: builders, fakes and helpers the test modules import.

A test module (`test_*.py`) imports only from here, tests/helpers.py,
tests/e2e/pods.py and the code under test, never from another test module
(tests/test_kit.py checks). Shared fixtures live in the conftest.py files.

- `tests.kit.metrics`: the Prometheus metrics the code defines, read from its AST.
- `tests.kit.server`: the webhook server on loopback TLS, and AdmissionReview bodies.
- `tests.kit.sidecar`: the sidecar's fakes (reporter, filler) and published Bentos.
- `tests.kit.chart`: rendering the Helm chart and kustomize overlays, normalised.
"""
