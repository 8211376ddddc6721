# syntax=docker/dockerfile:1.7
#
# One image for every colstream process: the stages (splitter, embedder, sink),
# the HTTP API, the topics init job and the all-in-one "lite" mode. Pick one with
# the command, e.g. `docker run IMAGE run embedder`.
#
# PyPI's torch wheels are CUDA builds that also run on CPU, so the same image
# serves CPU nodes and GPU nodes (the host only needs an NVIDIA driver new enough
# for the CUDA version of the wheel). Let pip pick torch and torchvision together:
# pinning torch alone can break torchvision (see docs/deploy.md).
#
# Build:  docker build -t colstream:latest .
# INT8:   docker build -t colstream:int8 --build-arg EXTRA_PIP_PACKAGES=bitsandbytes .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/colstream \
    PATH=/opt/colstream/bin:$PATH
RUN python -m venv /opt/colstream
WORKDIR /src

# Dependencies first, from pyproject.toml alone: the multi-GB torch layer is then
# rebuilt only when the dependency list changes, not on every source edit.
COPY pyproject.toml ./
RUN python - <<'PY' > /tmp/requirements.txt
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
PY
RUN pip install -r /tmp/requirements.txt

# Optional extras that are not hard dependencies, e.g. "bitsandbytes" for the
# INT8 embedder (model.quantization=int8 runs on CUDA only).
ARG EXTRA_PIP_PACKAGES=""
RUN if [ -n "$EXTRA_PIP_PACKAGES" ]; then pip install $EXTRA_PIP_PACKAGES; fi

COPY . .
RUN pip install --no-deps . && colstream --help > /dev/null


FROM ${PYTHON_IMAGE} AS runtime
ARG APP_UID=10001
LABEL org.opencontainers.image.title="colstream" \
      org.opencontainers.image.description="Kafka pipeline: documents -> ColPali-family multivectors in Qdrant" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid ${APP_UID} colstream \
 && useradd --system --uid ${APP_UID} --gid colstream --home-dir /home/colstream --create-home colstream \
 && mkdir -p /data /cache/huggingface \
 && chown -R colstream:colstream /data /cache

COPY --from=build /opt/colstream /opt/colstream

ENV PATH=/opt/colstream/bin:$PATH \
    VIRTUAL_ENV=/opt/colstream \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    COLSTREAM_STATE_DIR=/data \
    HF_HOME=/cache/huggingface

USER colstream
WORKDIR /data
# /data: embedded Qdrant Edge and local blobs (lite mode only);
# /cache: model weights downloaded from the Hugging Face hub.
VOLUME ["/data", "/cache"]
EXPOSE 8000

ENTRYPOINT ["colstream"]
CMD ["run", "api"]
