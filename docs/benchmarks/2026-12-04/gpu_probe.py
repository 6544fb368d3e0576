"""Where the GPU time goes, in one process with no gRPC: the torch backend alone, the same through the batcher from an
event loop (one caller, then 32), and the generation engine at 1 and 16 streams against bare generate(), each with
Python's default thread switch interval (5 ms) and with 0.5 ms. Run on the GPU machine after scripts/gpu_check.sh's
wheel install, over the random models it builds:

    python3 docs/benchmarks/2026-12-04/gpu_probe.py REPO > probe.json
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from services.common.repository import ModelRepository
from services.inference.backends.torch import TorchBackend
from services.inference.batching.batcher import Batcher
from services.inference.generation.engine import GenerationEngine
from services.inference.generation.sampler import SamplingParams
from tandem.bench.bare_generation import BareCausalLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: only to try the script out
TEXT = "how do I reset the password of my account on the website"


def ms(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {"p50_ms": statistics.median(v) * 1000, "p90_ms": v[int(0.9 * (len(v) - 1))] * 1000, "n": len(v)}


class Rows:
    def __init__(self) -> None:
        self.rows: list[int] = []

    def queued(self, seconds: float) -> None:
        pass

    def batch(self, rows: int, padded_tokens: int, seconds: float) -> None:
        self.rows.append(rows)


def embedding(repo: ModelRepository) -> dict[str, Any]:
    version = repo.resolve("bert-base")
    backend = TorchBackend(version, DEVICE, 16)
    tokenizer: Any = AutoTokenizer.from_pretrained(str(version.path))
    ids = np.asarray(tokenizer(TEXT)["input_ids"], dtype=np.int64)
    mask = np.ones_like(ids)
    for _ in range(20):
        backend.run(ids[None], mask[None], None)
    direct = []
    for _ in range(200):
        t0 = time.perf_counter()
        backend.run(ids[None], mask[None], None)
        direct.append(time.perf_counter() - t0)
    result: dict[str, Any] = {"direct": ms(direct)}

    rows = Rows()

    async def through_batcher(batcher: Batcher, callers: int, requests: int) -> dict[str, Any]:
        cu = np.asarray([0, len(ids)], dtype=np.int32)
        latencies: list[float] = []

        async def caller(n: int) -> None:
            for _ in range(n):
                t0 = time.perf_counter()
                await batcher.submit(ids, None, cu, None, pool=True)
                latencies.append(time.perf_counter() - t0)

        await caller(10)
        latencies.clear()
        rows.rows.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(caller(requests // callers) for _ in range(callers)))
        seconds = time.perf_counter() - t0
        return {
            **ms(latencies),
            "texts_per_s": len(latencies) / seconds,
            "mean_rows": statistics.mean(rows.rows),
            "calls": len(rows.rows),
        }

    # The bare ceiling for one-text requests: 32 texts per call.
    batch = (np.tile(ids, (32, 1)), np.ones((32, len(ids)), dtype=np.int64))
    t0 = time.perf_counter()
    for _ in range(64):
        backend.run(batch[0], batch[1], None)
    result["direct_batch32_texts_per_s"] = 64 * 32 / (time.perf_counter() - t0)

    async def both() -> None:
        batcher = Batcher(backend, version.config, version.ref, 0, rows, instances=1, call_cost_tokens=4096.0)
        try:
            result["batcher_c1"] = await through_batcher(batcher, 1, 200)
            result["batcher_c32"] = await through_batcher(batcher, 32, 2048)
        finally:
            await batcher.close()  # closes the backend too

    asyncio.run(both())
    return result


def generation(repo: ModelRepository) -> dict[str, Any]:
    version = repo.resolve("smollm2-shape")
    bare = BareCausalLM(version.path, 16, False, version.config.dtype, DEVICE)
    prompt = bare.encode(TEXT)
    bare.generate([prompt], 8)
    prefill = min(_timed(lambda: bare.generate([prompt], 1)) for _ in range(3))
    full = min(_timed(lambda: bare.generate([prompt], 33)) for _ in range(3))
    batch16 = min(_timed(lambda: bare.generate([prompt] * 16, 33)) for _ in range(2))
    result: dict[str, Any] = {
        "bare_prefill_ms": prefill * 1000,
        "bare_per_token_ms": (full - prefill) / 32 * 1000,
        "bare_batch16_tokens_per_s": 16 * 33 / batch16,
    }
    engine = GenerationEngine(version, DEVICE, 16)
    engine.warm_up()

    async def streams(count: int, tokens: int, rounds: int = 1) -> dict[str, Any]:
        ttft: list[float] = []
        itl: list[float] = []

        async def one() -> None:
            t0 = last = time.perf_counter()
            first = True
            params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
            async for _ in engine.generate(prompt, params, None):
                now = time.perf_counter()
                if first:
                    ttft.append(now - t0)
                    first = False
                else:
                    itl.append(now - last)
                last = now

        await one()
        ttft.clear()
        itl.clear()
        t0 = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(one() for _ in range(count)))
        seconds = time.perf_counter() - t0
        return {"ttft": ms(ttft), "itl": ms(itl), "tokens_per_s": rounds * count * tokens / seconds}

    async def run() -> dict[str, Any]:
        return {"c1": await streams(1, 33, 5), "c16": await streams(16, 33, 2)}

    result.update(asyncio.run(run()))
    engine.close()
    return result


def _timed(fn: Any) -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    repo = ModelRepository(Path(sys.argv[1]))
    report: dict[str, Any] = {}
    for interval in (0.005, 0.0005):
        sys.setswitchinterval(interval)
        key = f"switch_{interval * 1000:g}ms"
        report[key] = {"embedding": embedding(repo), "generation": generation(repo)}
        print(json.dumps({key: report[key]}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
