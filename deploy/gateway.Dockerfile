# syntax=docker/dockerfile:1
# The gateway image: FastAPI, uvicorn and the Redis client; no torch, no transformers.
# Build from the repository root:
#   docker build -f deploy/gateway.Dockerfile -t chatstream-gateway:local .
# It also runs `chatstream worker --model mock` (no torch needed), as docker-compose.yml's
# worker-mock service does.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 chatstream \
    && useradd --system --uid 10001 --gid chatstream --create-home --home-dir /home/chatstream \
        --shell /usr/sbin/nologin chatstream

# The base install only (pyproject.toml's `dependencies`, no extras): the gateway, the CLI and
# `chatstream status`. torch and transformers come with the `worker` extra, the embedded Redis
# with `local`; neither is here.
COPY pyproject.toml README.md /src/
COPY shared /src/shared
COPY gateway /src/gateway
COPY worker /src/worker
COPY chatstream_cluster /src/chatstream_cluster
RUN pip install /src && rm -rf /src

# Fail the build, not the deploy: the CLI must import without torch, and torch must be absent.
RUN chatstream gateway --help > /dev/null \
    && chatstream healthcheck --help > /dev/null \
    && ! python -c "import torch" 2> /dev/null

USER 10001:10001
WORKDIR /home/chatstream
EXPOSE 8000

# Liveness only (/healthz); /readyz also needs a live worker, which is not this container's job.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["chatstream", "healthcheck", "--url", "http://127.0.0.1:8000/healthz"]

# 0.0.0.0 needs CHATSTREAM_SESSION_SECRET: the gateway refuses the default secret off loopback.
CMD ["chatstream", "gateway", "--host", "0.0.0.0", "--port", "8000"]
