#!/usr/bin/env bash
# The GPU checks as one short run (under 8 minutes) on the GPU machine this workplace may lend (the `device` tool;
# about 15 minutes of device time in all, start-up included), and the same script on this CPU machine as a dry run:
#
#   bash scripts/gpu_wheels.sh                       # here, once: wheels the GPU image lacks + tokenizer files, in .whl/
#   device run, carry .whl:  bash scripts/gpu_check.sh
#   here / in CI:            bash scripts/gpu_check.sh --dry-run
#
# Steps, each timed and logged on its own (a failing step does not stop the next ones; the exit status is the first
# failure's):
#   1. the device: torch, transformers, the GPU's name (the dry run: the CPU, no CUDA asked for);
#   2. tests/gpu (torch backend fp32/fp16 against the CPU, the batcher's token budget on the GPU, ONNX Runtime's CUDA
#      provider with I/O binding where onnxruntime-gpu is installed, generation in fp16 against generate()) and the
#      generation tests over the four services with the causal LMs on the GPU (tiny models' tandem.json: device auto).
#      The dry run runs tests/gpu on the CPU (TANDEM_GPU_TESTS_ON_CPU=1);
#   3. random models of real shapes (tandem/bench/random_model.py): BERT-base for embeddings and a SmolLM2-135M-shaped
#      Llama for generation, float16 on the GPU (dry run: 2-layer models, float32, CPU);
#   4. `tandem serve` over them, then `tandem bench`: 1 x 1 and 32 x 1 text, 4 x 64 texts, the bare model (the same
#      torch module on the same GPU) measured in the same run; `tandem bench --api generate` at 1, 16 and 64 streams
#      against generate() on the same GPU;
#   5. $OUT/gpu_check.json: every step's status and seconds, the test counts, the bench cells with their ratios; and
#      $OUT/logs.tar.gz: every step's log, the server's and the bench.json files (the device tool brings back at most
#      8 files).
set -uo pipefail
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
work=$(mktemp -d /tmp/gpu-check-work.XXXXXX)
logs=$work/logs
mkdir -p "$logs"
py=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then py=.venv/bin/python; fi
if [ "$dry" = 0 ] && [ -d .whl ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheels did not install"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
tokenizer=.whl/tokenizer
[ -f "$tokenizer/vocab.txt" ] || tokenizer=$($py -c 'from services.common.default_model import packaged_model_dir as d; print(d())')
if [ "$dry" = 1 ]; then
  size=small dtype=float32 texts_per_cell=96 gen_levels=1,4 gen_tokens=8 gen_prompts=8 tests_s=300
  export TANDEM_GPU_TESTS_ON_CPU=1
else
  size=base dtype=float16 texts_per_cell=2048 gen_levels=1,16,64 gen_tokens=64 gen_prompts=32 tests_s=240
fi
# For experiments on the device (defaults above): SKIP_TESTS=1, INFERENCE_ARGS (flags of the inference stage),
# TEXTS_PER_CELL, GEN_LEVELS, GEN_PROMPTS, and PROBE (a Python script run with the random models' repository).
texts_per_cell=${TEXTS_PER_CELL:-$texts_per_cell}
gen_levels=${GEN_LEVELS:-$gen_levels}
gen_prompts=${GEN_PROMPTS:-$gen_prompts}
status=0
steps=()
step() {  # step NAME TIMEOUT_S COMMAND...: runs it with a time limit, logs to $logs/NAME.txt, records status and time
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$logs/$name.txt" 2>&1
  rc=$?
  tail -n 25 "$logs/$name.txt"
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  steps+=("$name:$rc:$((SECONDS - t0))")
  [ "$status" = 0 ] && [ "$rc" != 0 ] && status=$rc
  return 0
}

step device 60 $py - "$dry" <<'PY'
import os, sys, torch, transformers
dry = sys.argv[1] == "1"
print("torch", torch.__version__, "transformers", transformers.__version__, "cpus", os.cpu_count())
if dry:
    print("dry run: CPU only")
else:
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    print("gpu", torch.cuda.get_device_name(0), torch.version.cuda)
PY

if [ "${SKIP_TESTS:-0}" = 1 ]; then
  echo "tests skipped (SKIP_TESTS=1)"
elif [ "$dry" = 1 ]; then
  step tests "$tests_s" $py -m pytest -q -p no:cacheprovider -W ignore tests/gpu
else
  step tests "$tests_s" $py -m pytest -q -p no:cacheprovider -W ignore --timeout 120 tests/gpu \
    tests/service/test_generate.py tests/service/test_sdk_generate.py
fi

repo=$work/repo
step models 120 bash -c "$py -m tandem.bench.random_model --out $repo --tokenizer $tokenizer --size $size --dtype $dtype \
  && $py -m tandem.bench.random_model --out $repo --kind causal --tokenizer $tokenizer --size $size --dtype $dtype"

if [ -n "${PROBE:-}" ]; then
  step probe 240 $py "$PROBE" "$repo"
  cp "$logs/probe.txt" "$out/probe.txt"
fi

port=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target=127.0.0.1:$port
setsid $py -m tandem.cli serve --model-repository "$repo" --home "$work/home" --port "$port" \
  --inference-args="${INFERENCE_ARGS:-}" >"$logs/serve.txt" 2>&1 &
serve_pid=$!
stop_serve() { kill -TERM -- -"$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null; }
trap stop_serve EXIT
step ready 180 $py - "$target" <<'PY'
import sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1])
stub = health_pb2_grpc.HealthStub(channel)
t0 = time.monotonic()
while True:
    try:
        if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
            break
    except grpc.RpcError:
        pass
    time.sleep(0.5)
print(f"gateway {sys.argv[1]} serving after {time.monotonic() - t0:.1f} s")
PY

bench=($py -m tandem.cli bench --target "$target" --model-repository "$repo" --home "$work/home" --threads 1)
step embed-1 150 "${bench[@]}" --model bert-base --api embed --concurrency 1,32 --texts-per-request 1 \
  --texts-per-cell "$texts_per_cell" --bare-batch 64 --no-bare-beside --out "$work/embed-1"
step embed-64 150 "${bench[@]}" --model bert-base --api embed --concurrency 4 --texts-per-request 64 \
  --texts-per-cell "$((texts_per_cell * 2))" --bare-batch 64 --no-bare-beside --out "$work/embed-64"
step generate 200 "${bench[@]}" --model smollm2-shape --api generate --concurrency "$gen_levels" \
  --max-new-tokens "$gen_tokens" --prompts "$gen_prompts" --requests-per-stream 2 --min-requests 8 \
  --bare-single-prompts 4 --bare-reps 2 --out "$work/generate"
stop_serve
trap - EXIT
[ "$dry" = 1 ] || nvidia-smi >"$logs/nvidia-smi.txt" 2>&1

$py - "$out" "$work" "$dry" "${steps[@]}" <<'PY'
import json, re, sys
from pathlib import Path
out, work, dry, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
logs = work / "logs"
summary = {"dry_run": dry, "device": (logs / "device.txt").read_text().strip().splitlines(), "steps": {}}
for entry in steps:
    name, rc, seconds = entry.rsplit(":", 2)
    summary["steps"][name] = {"exit": int(rc), "seconds": int(seconds)}
tests = (logs / "tests.txt").read_text().strip().splitlines() if (logs / "tests.txt").exists() else []
counts = re.findall(r"(\d+) (passed|failed|skipped|errors?)", tests[-1] if tests else "")
summary["tests"] = {kind: int(n) for n, kind in counts}
summary["tests_failed"] = [line for line in tests if line.startswith(("FAILED", "ERROR"))]
for name in ("embed-1", "embed-64", "generate"):
    path = work / name / "bench.json"
    if not path.exists():
        continue
    report = json.loads(path.read_text())
    scalar = lambda d: {k: v for k, v in d.items() if not isinstance(v, (list, dict)) or k == "batched_tokens_per_s"}
    summary[name] = {
        "bare": scalar(report.get("bare", {})),
        "cells": [scalar(cell) for cell in report["results"]],
        **({"acceptance": report["acceptance"]} if "acceptance" in report else {}),
    }
    (logs / f"{name}.json").write_text(json.dumps(report, indent=2))
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
tar -czf "$out/logs.tar.gz" -C "$work" logs
echo "gpu_check: exit $status; results in $out/gpu_check.json, logs in $out/logs.tar.gz"
exit "$status"
