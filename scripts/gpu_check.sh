#!/usr/bin/env bash
# The GPU checks, as one short run on a lent GPU machine (the `device` tool; about 15 minutes of device time in all,
# start-up included). Run from the repository root there:
#
#   bash scripts/gpu_wheels.sh             # here, once: the wheels the GPU image lacks, into .whl/ (git-ignored)
#   device run (carry .whl):  bash scripts/gpu_check.sh
#
# What it checks: CUDA is seen; the generation stack on CUDA (the tiny causal LMs' tandem.json says device "auto", so
# the inference stage puts them on the GPU) gives the same tokens as Hugging Face generate() on the same GPU, with
# cancellation and deadlines; the gpu-marked tests; and a short `tandem bench --api generate` on the tiny GPT-2.
set -euo pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 - <<'PY' 2>&1 | tee "$out/device.txt"
import torch, transformers
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name(0))
PY
# Generation end to end on CUDA, and everything marked gpu.
timeout 420 python3 -m pytest -q -p no:cacheprovider -x -W ignore \
  tests/service/test_generate.py tests/service/test_sdk_generate.py -m "not e2e" 2>&1 | tee "$out/generate-tests.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/gpu-tests.txt" || true
echo "done; logs in $out"
