# syntax=docker/dockerfile:1
# The worker image: one `chatstream worker` per GPU, torch built for CUDA.
# Build from the repository root:
#   docker build -f deploy/worker.Dockerfile -t chatstream-worker:local .
# Pick another CUDA build of torch with build args, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#   --build-arg CUDA_BASE=nvidia/cuda:12.6.3-base-ubuntu24.04
# (keep the two CUDA versions equal; see pytorch.org's install matrix for what a torch
# version ships). The host needs an NVIDIA driver new enough for that CUDA version and the
# NVIDIA Container Toolkit.
#
# Why the `base` flavour of nvidia/cuda and not `runtime`: torch's CUDA wheels bring their own
# cuBLAS, cuDNN and NCCL, so `runtime` would ship them twice (several GB). `base` still sets
# NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES and NVIDIA_REQUIRE_CUDA, so a host whose
# driver is too old fails at start with a clear message.
ARG CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG UV_VERSION=0.8.0

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

FROM ${CUDA_BASE}

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/chatstream/.cache/huggingface

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Python 3.11 from uv's standalone builds: Ubuntu 24.04 ships only 3.12.
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --python "${PYTHON_VERSION}" "${VIRTUAL_ENV}"

# torch from the PyTorch CUDA index, in its own layer (it is the big one). The project's
# `torch>=...` requirement is then already met and the install below keeps this build.
RUN uv pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

RUN groupadd --system --gid 10001 chatstream \
    && useradd --system --uid 10001 --gid chatstream --create-home --home-dir /home/chatstream \
        --shell /usr/sbin/nologin chatstream \
    && mkdir -p /home/chatstream/.cache/huggingface \
    && chown -R chatstream:chatstream /home/chatstream

COPY pyproject.toml README.md /src/
COPY shared /src/shared
COPY gateway /src/gateway
COPY worker /src/worker
COPY chatstream_cluster /src/chatstream_cluster
RUN uv pip install "/src[worker]" && rm -rf /src

# Fail the build, not the deploy: the CLI imports, and torch is a CUDA build.
RUN chatstream worker --help > /dev/null \
    && chatstream healthcheck --help > /dev/null \
    && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch is a CPU build')"

USER 10001:10001
WORKDIR /home/chatstream

# Worker id = CHATSTREAM_WORKER_ID, or the container's hostname when unset, so that the
# HEALTHCHECK below (a separate process that does not see what the entrypoint exports) asks
# Redis about the same id with the same expression.
ENTRYPOINT ["/bin/sh", "-c", "export CHATSTREAM_WORKER_ID=\"${CHATSTREAM_WORKER_ID:-$HOSTNAME}\"; exec \"$@\"", "--"]

# Healthy = this worker heartbeated within its TTL. The start period covers model download.
HEALTHCHECK --interval=15s --timeout=10s --start-period=600s --retries=3 \
    CMD chatstream healthcheck --redis-url "$CHATSTREAM_REDIS_URL" --worker-id "${CHATSTREAM_WORKER_ID:-$HOSTNAME}"

# The container sees only the GPUs it was given, numbered from 0 (see docker-compose.yml).
CMD ["chatstream", "worker", "--device", "cuda:0"]
