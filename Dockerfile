# syntax=docker/dockerfile:1
#
# mcp-credential-sidecar: a credential-injecting egress sidecar for MCP servers.
#
#   docker build -t mcp-credential-sidecar:local .
#   docker run --rm -v "$PWD/sidecar.yaml:/etc/credential-sidecar/config.yaml:ro" \
#     mcp-credential-sidecar:local
#
# Two stages: the builder resolves and installs every dependency into a venv and
# compiles the request path to C with mypyc (setup.py; about 20% less CPU per
# request, bench/RESULTS.md); the final stage gets that venv (the package is
# installed inside it, not editable) and nothing else: no compiler, no mypy, no
# pip cache, no source tree. --build-arg SIDECAR_COMPILE=0 builds pure Python.

# Both stages use the same base so the venv's python symlink stays valid.
# Pin by digest (python:3.12-slim-bookworm@sha256:...) in a release pipeline.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

# The C compiler for mypyc; this stage only.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

ARG SIDECAR_COMPILE=1
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src
COPY pyproject.toml README.md setup.py ./
COPY scripts/build_backend.py ./scripts/
COPY sidecar ./sidecar
# A regular (non-editable) install: the package lands in the venv's site-packages
# with its .pyc files compiled now, because the root filesystem is read-only at run time.
# botocore (Secrets Manager) is a core dependency; fast: uvloop; tracing: OpenTelemetry
# (loaded only when tracing.otlp_endpoint is set). pip itself is not needed
# at run time, so it leaves the venv (about 17 MB). mypy is only in pip's throw-away
# build environment. The last line fails the build if nothing was compiled.
RUN SIDECAR_COMPILE=${SIDECAR_COMPILE} pip install ".[fast,tracing]" \
 && python -m pip uninstall --yes pip \
 && cd / && python -c "import sys; from sidecar.buildinfo import build; print('sidecar build:', build()); \
      sys.exit('${SIDECAR_COMPILE}' == '1' and build() != 'compiled')"

FROM ${PYTHON_IMAGE}

ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mcp-credential-sidecar" \
      org.opencontainers.image.description="Per-client credential injection and egress perimeter beside MCP servers" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# A fixed numeric UID/GID so Kubernetes can verify runAsNonRoot without a
# passwd lookup; the chart's securityContext uses the same numbers.
RUN groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin sidecar

COPY --from=builder /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIDECAR_CONFIG=/etc/credential-sidecar/config.yaml

USER 10001:10001

# 8080: data plane (route and forward-proxy mode); 9901: admin (/healthz, /readyz, /metrics).
EXPOSE 8080 9901

# No curl or wget in the image: the interpreter asks the admin listener itself.
# ProxyHandler({}) so an HTTP_PROXY in the environment never captures the probe.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:9901/healthz', timeout=2)"]

ENTRYPOINT ["credential-sidecar", "run"]
