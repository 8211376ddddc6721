# colstream images, two targets from one file (classic builder or BuildKit alike):
#
#   docker build --target cpu -t colstream:0.1.0 .        # splitter, sink, api, webhooks, topics job
#   docker build --target gpu -t colstream-gpu:0.1.0 .    # embedder (CUDA 13.0 runtime from the lock)
#   docker build --target gpu --build-arg EXTRA_PIP_PACKAGES=bitsandbytes -t colstream-gpu:0.1.0-int8 .
#
# Both install exactly requirements.lock (hashes checked). The cpu target replaces
# the CUDA build of torch/torchvision with the CPU build of the same versions from the
# PyTorch CPU index and drops the nvidia-* wheels, so CPU pods do not carry CUDA.
# The gpu target keeps the lock's CUDA 13.0 runtime wheels, which need an NVIDIA
# driver >= 580 on the node (deploy/versions.env pins the GPU Operator's driver).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build-base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/colstream \
    PATH=/opt/colstream/bin:$PATH
RUN python -m venv /opt/colstream
WORKDIR /src
COPY requirements.lock deploy/docker/split_lock.py ./

FROM build-base AS build-cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN python split_lock.py requirements.lock /tmp/cpu-requirements.txt /tmp/torch-cpu.txt \
 && pip install --no-deps --require-hashes -r /tmp/cpu-requirements.txt \
 && pip install --no-deps --index-url "$TORCH_CPU_INDEX" -r /tmp/torch-cpu.txt
COPY . .
RUN pip install --no-deps . && colstream --help > /dev/null

FROM build-base AS build-gpu
RUN pip install --no-deps --require-hashes -r requirements.lock
# Optional extras outside the lock, e.g. "bitsandbytes" for the INT8 embedder; the
# caller chooses (and may pin) them.
ARG EXTRA_PIP_PACKAGES=""
# hadolint ignore=DL3013
RUN if [ -n "$EXTRA_PIP_PACKAGES" ]; then pip install $EXTRA_PIP_PACKAGES; fi
COPY . .
RUN pip install --no-deps . && colstream --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime-base
ARG APP_UID=10001
LABEL org.opencontainers.image.title="colstream" \
      org.opencontainers.image.description="Kafka pipeline: documents -> ColPali-family multivectors in Qdrant" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid ${APP_UID} colstream \
 && useradd --system --uid ${APP_UID} --gid colstream --home-dir /home/colstream --create-home colstream \
 && mkdir -p /data /cache/huggingface \
 && chown -R colstream:colstream /data /cache
ENV PATH=/opt/colstream/bin:$PATH \
    VIRTUAL_ENV=/opt/colstream \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    COLSTREAM_STATE_DIR=/data \
    HF_HOME=/cache/huggingface
WORKDIR /data
# /data: embedded Qdrant Edge and local blobs (lite mode only); /cache: model weights.
# With a read-only root filesystem both (and /tmp) are volumes.
VOLUME ["/data", "/cache"]
EXPOSE 8000 9400
ENTRYPOINT ["colstream"]
CMD ["run", "api"]

FROM runtime-base AS gpu
COPY --from=build-gpu /opt/colstream /opt/colstream
USER 10001:10001

# Last, so a plain `docker build .` gives the CPU image.
FROM runtime-base AS cpu
# LibreOffice renders Office formats to PDF in the splitter.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libreoffice-core libreoffice-writer libreoffice-calc libreoffice-impress \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build-cpu /opt/colstream /opt/colstream
USER 10001:10001
