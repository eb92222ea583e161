# One image for the injector and the sidecar. The juicefs client comes from
# the upstream image; the Python code from this repo.
FROM juicedata/mount:ce-v1.3.0 AS juicefs

FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=juicefs /usr/local/bin/juicefs /usr/local/bin/juicefs
WORKDIR /app
COPY pyproject.toml README.md ./
COPY injector ./injector
COPY sidecar ./sidecar
RUN pip install --no-cache-dir .
USER 65532:65532
ENTRYPOINT ["python", "-m"]
CMD ["injector", "serve", "--config", "/etc/bento-juicefs/config.yaml"]
