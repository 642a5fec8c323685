# syntax=docker/dockerfile:1
#
# The scoring service: onnxruntime and the committed bundle, no torch.
#
#   docker build -t gradient-uncertainty:gpu .                        # CUDA (default)
#   docker build -t gradient-uncertainty:cpu --build-arg VARIANT=cpu .
#
# GPU: run with `--gpus all` (or docker-compose.gpu.yml); GET /readyz says which execution
# provider each scorer graph really runs on (it falls back to CPU without a GPU).

ARG VARIANT=gpu
# Ubuntu 24.04, not 22.04: the project needs Python >= 3.11 and 22.04 ships 3.10.
# CUDA 12 + cuDNN 9 is what onnxruntime-gpu from PyPI is built against.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- wheel: the project as a wheel (app, scoring, training code; no extras) ------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY app ./app
COPY scoring ./scoring
COPY training ./training
# The client package and the default bundle (package gradunc_models) are in the wheel too.
COPY gradunc_client ./gradunc_client
COPY models/__init__.py ./models/
COPY models/default ./models/default
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- the two runtime bases -------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
ENV ONNXRUNTIME_PACKAGE=onnxruntime

FROM ${CUDA_IMAGE} AS base-gpu
# The distribution's Python 3.12; its version moves with the base image tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV ONNXRUNTIME_PACKAGE=onnxruntime-gpu

# ---- venv: dependencies installed on the runtime base, copied into the final stage ----
# base-${VARIANT} is one of the stages above, not an image from a registry.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS venv
COPY --from=wheel /wheels /wheels
# `pip install <wheel>` without the `training` extra: no torch. For the GPU build the CPU
# onnxruntime the project depends on is swapped for onnxruntime-gpu of the same version
# (both provide the `onnxruntime` module and must not be installed together).
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir /wheels/*.whl \
    && if [ "$ONNXRUNTIME_PACKAGE" != onnxruntime ]; then \
         version=$(/opt/venv/bin/python -c "import onnxruntime; print(onnxruntime.__version__)") \
         && /opt/venv/bin/pip uninstall -y onnxruntime \
         && /opt/venv/bin/pip install --no-cache-dir "$ONNXRUNTIME_PACKAGE==$version"; \
       fi \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
    && /opt/venv/bin/python -c "import app.main, scoring.runtime"

# ---- runtime -----------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
RUN groupadd --gid 10001 scorer \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin scorer
COPY --from=venv /opt/venv /opt/venv
COPY models/default /srv/models/default
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GRADUNC_BUNDLE_DIR=/srv/models/default \
    GRADUNC_HOST=0.0.0.0 \
    GRADUNC_PORT=8000
WORKDIR /srv
USER 10001:10001
EXPOSE 8000
# Healthy = bundle loaded and warm (GET /readyz), which is what dependants wait for.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('GRADUNC_PORT', '8000'), timeout=2)"]
CMD ["gradient-uncertainty-serve"]
