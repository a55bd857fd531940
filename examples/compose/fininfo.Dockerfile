# syntax=docker/dockerfile:1
#
# The fininfo example MCP server (examples/fininfo) as an image, for
# examples/docker-compose.yml and the Helm chart's default app. The build
# context is examples/fininfo:
#
#   docker build -f examples/compose/fininfo.Dockerfile -t fininfo-mcp:local examples/fininfo
#
# It holds no API key: the credential sidecar beside it injects them.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"
# The mcp SDK with MCPServer (mcp.server.mcpserver) and httpx for the outbound calls.
RUN pip install "mcp>=2.3,<3" "httpx>=0.27" \
 && python -m pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="fininfo-mcp" \
      org.opencontainers.image.description="fininfo example MCP server; API keys are injected by mcp-credential-sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"
# Its own UID, not the sidecar's: sharing a network namespace shares no files.
RUN groupadd --system --gid 10002 fininfo \
 && useradd --system --uid 10002 --gid 10002 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin fininfo
COPY --from=builder /opt/venv /opt/venv
COPY server.py /app/server.py
ENV PATH="/opt/venv/bin:${PATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10002:10002
EXPOSE 8000
# A TCP connect: the MCP endpoint answers plain GETs with an error status by design.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 8000), 2).close()"]
ENTRYPOINT ["python", "/app/server.py"]
# All interfaces of its network namespace, so a published port reaches it.
CMD ["--host", "0.0.0.0", "--port", "8000"]
