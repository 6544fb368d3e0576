#!/usr/bin/env bash
# Downloads, into .whl/, the wheels scripts/gpu_check.sh needs on the GPU machine that its image lacks (that image has
# Python 3.12 with torch, transformers, tokenizers, grpcio, protobuf, numpy, pytest; no package index), and copies the
# built-in model's tokenizer files into .whl/tokenizer/ (the GPU run builds random models with them). Run here, then
# carry .whl to the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for n in 2_28 2_27 2_17 2_5; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 grpcio-status==1.85.1 \
  "protobuf>=7.35.1,<8" googleapis-common-protos pydantic pydantic-core pydantic-settings python-dotenv \
  typing-inspection annotated-types opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions \
  opentelemetry-instrumentation opentelemetry-instrumentation-grpc opentelemetry-exporter-otlp-proto-grpc \
  opentelemetry-exporter-otlp-proto-common opentelemetry-proto wrapt loky cloudpickle prometheus-client \
  pytest-asyncio pytest-timeout hypothesis sortedcontainers cryptography cffi pycparser uvloop
# The tokenizer files of the random models scripts/gpu_check.sh builds there (tandem/bench/random_model.py).
mkdir -p .whl/tokenizer
model=$(PYTHONPATH=$PWD "${PYTHON:-.venv/bin/python}" -c 'from services.common.default_model import packaged_model_dir; print(packaged_model_dir())')
for f in tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json; do cp "$model/$f" .whl/tokenizer/; done
du -sh .whl
