# Everything a fresh machine needs is installed by these targets themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help venv lock test fast lint typecheck unit e2e binaries images cluster-up cluster-down golden-update values-table bench bench-load bench-agent fuzz render-example release demo clean

# Every target, one line each (tests/test_makefile.py checks that none is missing).
help:
	@echo "make test          make fast, then builds binaries and images and runs the other tests (e2e included)"
	@echo "make fast          lint, type-check and the tests that need no binaries, images or root (fails fast)"
	@echo "make demo          control plane + a real node + JuiceFS: the example Bento injected (unprivileged, a baseline namespace), run and Ready, then kubectl describe pod"
	@echo "make lint          ruff (check and format) and the import-linter layer contract"
	@echo "make typecheck     mypy --strict"
	@echo "make unit          the tests that need no cluster (pytest -m 'not e2e')"
	@echo "make e2e           the end-to-end tests on the local cluster (builds binaries and images first)"
	@echo "make binaries      etcd, Kubernetes, containerd, MinIO, JuiceFS, Helm, Prometheus into ~/.cache/bento-juicefs"
	@echo "make images        the node's images (base rootfs, the project's image, the sample Bento, pause)"
	@echo "make cluster-up    a local control plane and node to poke at (NODES=3 for three nodes)"
	@echo "make cluster-down  stops what make cluster-up started"
	@echo "make golden-update regenerate tests/golden/*.injected"
	@echo "make values-table  regenerate the chart's values table in docs/values.md from values.yaml"
	@echo "make render-example the injector's offline render of examples/bento-deployment.yaml"
	@echo "make fuzz          the admission path on 100,000+ fuzzed inputs (hypothesis, /mutate over HTTPS, atheris); bench-results/fuzz.json"
	@echo "make bench         streaming, cold-start, warm-start (with the warm gate), admission, load, redis, agent-lists against their limits (SCENARIO=NAME for one); bench-results/"
	@echo "make bench-load    10,000 reviews per run at 500 connections over TLS: errors, 5xx, the injector's memory; bench-results/load.json"
	@echo "make bench-agent   the node agent's LISTs a minute and memory with 5,000 Deployments (a control plane, no kubelet); bench-results/agent-lists.json"
	@echo "make venv          the virtualenv alone: requirements/dev.txt (hash-locked), then the project itself"
	@echo "make lock          regenerate requirements/{dev,runtime,build}.txt (uv, hashes for every platform) from pyproject.toml"
	@echo "make release       dist/: the image's OCI archive, the packaged chart, an SPDX SBOM of the image, SHA256SUMS"
	@echo "make clean         removes the virtualenv and the tool caches"
	@echo "make help          this list"

# The dependencies from the hash-locked requirements/dev.txt (the image installs
# requirements/runtime.txt, the same versions), then the project, editable.
$(STAMP): pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Both locks for CPython 3.11 (Debian bookworm's, the image's) on every
# platform (--universal: amd64 and arm64 wheels alike), runtime.txt
# constrained to dev.txt's versions so the tests run what the image installs
# (tests/test_lock.py checks both against pyproject.toml).
UV_VERSION := 0.13.10
LOCK_ARGS := --universal --python-version 3.11 --generate-hashes --quiet --custom-compile-command "make lock"
lock: $(STAMP)
	$(BIN)/pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_ARGS) -o requirements/dev.txt
	$(BIN)/uv pip compile pyproject.toml -c requirements/dev.txt $(LOCK_ARGS) -o requirements/runtime.txt
	$(BIN)/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' \
	  | $(BIN)/uv pip compile - $(LOCK_ARGS) -o requirements/build.txt

PY_DIRS := common modelstore injector sidecar nodeagent devcluster tests benchmarks hack

lint: $(STAMP)
	$(BIN)/ruff check $(PY_DIRS)
	$(BIN)/ruff format --check $(PY_DIRS)
	$(BIN)/lint-imports --no-cache --no-logo

typecheck: $(STAMP)
	$(BIN)/mypy

# Real etcd, kube-apiserver, controller-manager, scheduler, kubectl, kubelet,
# kube-proxy, containerd, MinIO, mc, JuiceFS and Helm, built once into
# ~/.cache/bento-juicefs (progress on stderr).
binaries: $(STAMP)
	PYTHON=$(BIN)/python bash hack/build-binaries.sh >/dev/null

# The node's images (base rootfs, the project's image, the sample Bento, pause),
# built without a registry and cached by content (progress on stderr).
images: $(STAMP)
	$(BIN)/python -m devcluster.images >/dev/null

unit: $(STAMP)
	$(BIN)/pytest -m "not e2e"

e2e: $(STAMP) binaries images
	$(BIN)/pytest -m e2e

# The tests that need the binaries (make binaries), the images (make images) or
# root, by path; every other test is in the fast lane. tests/e2e: a real
# cluster; tests/storage: JuiceFS, MinIO, Redis and FUSE mounts; test_chart.py
# test_chart_knobs.py and test_local_install.py: the pinned helm and kubectl; test_images.py: builds
# and runs the images; test_pod_mounts.py: two of its tests mount a tmpfs.
# tests/test_makefile.py checks these paths exist and that no other test module
# reaches for the binaries, the images or the storage stack.
SLOW_TESTS := tests/e2e tests/storage tests/test_chart.py tests/test_chart_knobs.py tests/test_alerts.py \
	tests/test_local_install.py \
	tests/test_images.py tests/test_pod_mounts.py

# Lint, type-check and the fast lane: no binaries, no images, no root, no cluster.
fast: $(STAMP) lint typecheck
	$(BIN)/pytest $(addprefix --ignore=,$(SLOW_TESTS))

# The whole suite with the injector installed by Helm as real pods (the
# default), then the install tests and admission tests again with it installed
# by `kubectl apply -k` over manifests/overlays/gke (devcluster/installs/injector_pods.py).
# The fast lane first and once: the second pytest runs only SLOW_TESTS.
KUSTOMIZE_E2E := tests/e2e/test_injector_pods.py tests/e2e/test_admission.py

test: fast binaries images
	$(BIN)/pytest $(SLOW_TESTS)
	BENTO_INJECTOR_INSTALL=kustomize $(BIN)/pytest -m e2e $(KUSTOMIZE_E2E)

NODES ?= 1
cluster-up: $(STAMP) binaries images
	@$(BIN)/python -m devcluster up --nodes $(NODES)

cluster-down: $(STAMP)
	@$(BIN)/python -m devcluster down

golden-update: $(STAMP)
	$(BIN)/pytest tests/test_golden.py --update-golden

# docs/values.md's table from the chart's values.yaml comments and its schema
# (tests/test_values_table.py fails when it is stale).
values-table: $(STAMP)
	$(BIN)/python hack/values_table.py

# Ratios against limits measured in the same run (BENCHMARKS.md); one table,
# bench-results/<scenario>.json each. SCENARIO=streaming|cold-start|warm-start|admission|load|redis|agent-lists
# runs one. Needs root and /dev/fuse (FUSE mounts, network namespaces, tc).
bench: $(STAMP) binaries images
	$(BIN)/python -m benchmarks $(if $(SCENARIO),--scenario $(SCENARIO)) $(BENCH_ARGS)

# The injector alone under load (no cluster, no root): bench-results/load.json.
bench-load: $(STAMP)
	$(BIN)/python -m benchmarks --scenario load $(BENCH_ARGS)

# The node agent against a control plane alone (no kubelet): its LISTs and WATCHes a
# minute idle and its memory with 5,000 Deployments; bench-results/agent-lists.json.
# BENCH_ARGS="--idle-seconds 120" for a quick run.
bench-agent: $(STAMP) binaries
	$(BIN)/python -m benchmarks --scenario agent-lists $(BENCH_ARGS)

# Fuzz the admission path (tests/fuzzing.py): 20,000 inputs per target, the
# real server's /mutate over HTTPS, and atheris (coverage-guided) when it
# installs; counts and times in bench-results/fuzz.json. FUZZ_ARGS=--help.
fuzz: $(STAMP)
	$(BIN)/pip install --quiet 'atheris>=2.3' || echo "atheris did not install: fuzzing without it"
	$(BIN)/python -m tests.fuzzing $(FUZZ_ARGS)

# The image (built by the local pipeline, as make images), the chart packaged
# with helm, an SPDX 2.3 SBOM read from the image's own layers, and
# SHA256SUMS, into dist/ (hack/release.py).
release: $(STAMP) binaries images
	$(BIN)/python hack/release.py

render-example: $(STAMP)
	$(BIN)/python -m injector render -f examples/bento-deployment.yaml

# The main job: control plane, injector, JuiceFS, a Bento pod injected and
# warmed by its sidecar, ending with kubectl describe pod.
demo: $(STAMP) binaries images
	$(BIN)/python -m devcluster.demo

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
