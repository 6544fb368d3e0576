"""The bare causal LM for `tandem bench --api generate`: the same model folder in this process, transformers'
`generate()` with nothing around it, in the dtype and on the device the inference stage uses (tandem.json's `dtype`
and `device`: the GPU where there is one and the device allows it), greedy, EOS disabled, the same prompts and
max_new_tokens as the Generate streams, and torch threads set to the inference stage's.

It must not run while the server is under load (the bench runs it before and after the levels), and its threads
must not exceed the free cores: above them, one-query SDPA waits at an OpenMP barrier for a descheduled thread and
`generate()` becomes many times slower (docs/design/generation-research.md, "threads"), which would flatter every
ratio.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class BareCausalLM:
    """A text-generation model version with nothing around it: its tokenizer and `model.generate()`."""

    def __init__(
        self, version_dir: Path, threads: int, chat: bool, dtype: str = "float32", device: str = "cpu"
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # generate()'s notes on unset flags
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # "Loading weights" of every load
        torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(version_dir))
        # As the tokenizer stage encodes: a copy with no padding or truncation (a tokenizer.json may carry either).
        self.plain: Any = type(self.tokenizer.backend_tokenizer).from_str(self.tokenizer.backend_tokenizer.to_str())
        self.plain.no_padding()
        self.plain.no_truncation()
        from services.inference.backends.torch import torch_dtype

        self.device = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(version_dir), dtype=torch_dtype(dtype), local_files_only=True
        )
        self.model: Any = model.to(self.device).eval()
        # generate() fills unset fields from model.generation_config: its EOS must go too, or it would still stop.
        self.model.generation_config.eos_token_id = None
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.model.config.pad_token_id
        self.pad = int(pad) if isinstance(pad, int) else 0
        self.config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=self.pad)  # type: ignore[no-untyped-call]
        self.chat = chat

    def generate_continuous(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
        """Transformers' own continuous batching (`generate_batch`) over all the prompts at once, greedy, EOS
        disabled: the tokens it generated. The manager is kept between calls (`persistent_manager`): setting one up
        takes 18 s on the 2-core VM, which is not generation; call `close_continuous` after the last."""
        from transformers import GenerationConfig

        config = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=self.pad
        )
        with self.torch.inference_mode():
            outputs = self.model.generate_batch(
                inputs=[list(p) for p in prompts],
                generation_config=config,
                progress_bar=False,
                persistent_manager=True,
                warmup=False,
            )
        return sum(len(o.generated_tokens) for o in outputs.values())

    def close_continuous(self) -> None:
        self.model.destroy_cached_continuous_batching_manager()

    def encode(self, prompt: str) -> list[int]:
        """The prompt's ids as the tokenizer stage makes them: the model's special tokens around a plain prompt, or
        one user message rendered with the chat template and its generation prompt."""
        backend = self.plain
        if not self.chat:
            return list(backend.encode(prompt, add_special_tokens=True).ids)
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(backend.encode(str(text), add_special_tokens=False).ids)

    def generate(self, batch: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of the prompts run as one left-padded batch; exactly max_new_tokens each."""
        torch = self.torch
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor(
            [[self.pad] * (width - len(ids)) + list(ids) for ids in batch], dtype=torch.long, device=self.device
        )
        mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], dtype=torch.long, device=self.device
        )
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=self.config,
                max_new_tokens=max_new_tokens,
                min_new_tokens=None,
            )
        rows = [[int(t) for t in row[width:].tolist()] for row in out]
        if any(len(row) != max_new_tokens for row in rows):
            raise RuntimeError(f"generate() stopped before {max_new_tokens} tokens: EOS was not disabled")
        return rows


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_bare_generation(
    version_dir: Path,
    prompts: Sequence[str],
    *,
    threads: int,
    max_new_tokens: int,
    single_prompts: int,
    batches: Sequence[int],
    reps: int = 3,
    chat: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    continuous: bool = False,
) -> dict[str, Any]:
    """The model alone on the bench's prompts:

    - one at a time: `generate()` of the first `single_prompts` prompts one after the other, tokens/s;
    - batched: every prompt (cycled up to a whole number of batches) in left-padded `generate()` batches of each size
      in `batches`, tokens/s;
    - at batch 1 on the median-length prompt: prefill = t(1 new token), per-token decode =
      (t(max_new_tokens) - t(1)) / (max_new_tokens - 1), each time the best of `reps`.

    Also each prompt's token count and the one-at-a-time answers (to check Tandem's against them).
    """
    load_before = os.getloadavg()
    lm = BareCausalLM(version_dir, threads, chat, dtype, device)
    ids = [lm.encode(p) for p in prompts]
    # Warm-up: lazy set-up and first-call allocations, at batch 1 and at the largest batch.
    lm.generate([ids[0]], max_new_tokens)
    lm.generate([ids[i % len(ids)] for i in range(max(batches, default=1))], 2)
    answers: list[list[int]] = []
    t0 = time.perf_counter()
    for prompt_ids in ids[:single_prompts]:
        answers += lm.generate([prompt_ids], max_new_tokens)
    single_s = time.perf_counter() - t0
    batched: dict[str, float] = {}
    for size in batches:
        rows = -(-len(ids) // size) * size
        cycled = [ids[i % len(ids)] for i in range(rows)]
        t0 = time.perf_counter()
        for i in range(0, rows, size):
            lm.generate(cycled[i : i + size], max_new_tokens)
        batched[str(size)] = rows * max_new_tokens / (time.perf_counter() - t0)
    continuous_rate: float | None = None
    if continuous:  # transformers' continuous batching on the largest batch's worth of the prompts, after a warm-up
        together = [ids[i % len(ids)] for i in range(max(batches, default=len(ids)))]
        try:
            lm.generate_continuous(together, 2)  # sets the manager up and runs every prompt's prefill once
            t0 = time.perf_counter()
            tokens = lm.generate_continuous(together, max_new_tokens)
            continuous_rate = tokens / (time.perf_counter() - t0)
        finally:
            lm.close_continuous()
    median = sorted(ids, key=len)[len(ids) // 2]
    prefill_s = min(_timed(lambda: lm.generate([median], 1)) for _ in range(reps))
    full_s = min(_timed(lambda: lm.generate([median], max_new_tokens)) for _ in range(reps))
    per_token_s = (full_s - prefill_s) / (max_new_tokens - 1) if max_new_tokens > 1 else float("nan")
    counts = [len(p) for p in ids]
    return {
        "threads": threads,
        "device": str(lm.device),
        "dtype": dtype,
        "max_new_tokens": max_new_tokens,
        "prompt_tokens_min": min(counts),
        "prompt_tokens_median": statistics.median(counts),
        "prompt_tokens_max": max(counts),
        "prompt_tokens": counts,
        "single_prompts": min(single_prompts, len(ids)),
        "single_tokens_per_s": len(answers) * max_new_tokens / single_s,
        "batched_tokens_per_s": batched,
        **({"continuous_tokens_per_s": continuous_rate} if continuous_rate is not None else {}),
        "median_prompt_tokens": len(median),
        "prefill_ms": prefill_s * 1000,
        "per_token_ms": per_token_s * 1000,
        "answers": answers,
        "load_average": [list(load_before), list(os.getloadavg())],
    }


def combine_bare_generation(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best of several bare measurements (before and after the levels): the highest tokens/s and the lowest
    prefill and per-token times, so a slow moment of the machine while the bare model ran never flatters a ratio."""
    best = dict(runs[0])
    best["single_tokens_per_s"] = max(run["single_tokens_per_s"] for run in runs)
    best["batched_tokens_per_s"] = {
        size: max(run["batched_tokens_per_s"][size] for run in runs) for size in runs[0]["batched_tokens_per_s"]
    }
    if all("continuous_tokens_per_s" in run for run in runs):
        best["continuous_tokens_per_s"] = max(run["continuous_tokens_per_s"] for run in runs)
    best["prefill_ms"] = min(run["prefill_ms"] for run in runs)
    best["per_token_ms"] = min(run["per_token_ms"] for run in runs)
    best["measurements"] = [{k: v for k, v in run.items() if k not in ("answers", "prompt_tokens")} for run in runs]
    return best


def measure_paired(
    lm: BareCausalLM,
    prompts: Sequence[str],
    max_new_tokens: int,
    served: Callable[[str], tuple[float, float]],
    rounds: int,
) -> dict[str, Any]:
    """Concurrency 1 with the bare model interleaved: per round, one prompt's bare prefill (the best of two) and
    per-token time (one full run), then the same prompt twice through the server (`served(prompt)` -> its time to
    first token and its inter-token latency p50, in seconds). A shared machine's speed drifts within minutes, so
    each served stream is compared with the bare model on the same prompt in the same minute, and the medians of
    those paired differences are the c=1 figures. The served time to first token is the best of its two streams, as
    the bare prefill is the best of two runs: the best of two samples of a noisy time sits below a single sample, so
    comparing a best of two with a single one would put a few milliseconds of noise on the server's side. The first
    stream's own figure is kept too (`ttft_first_ms`)."""
    rows: list[dict[str, float]] = []
    for i in range(rounds):
        ids = lm.encode(prompts[i % len(prompts)])
        lm.generate([ids], 2)
        prefill_s = min(_timed(lambda ids=ids: lm.generate([ids], 1)) for _ in range(2))  # type: ignore[misc]
        full_s = _timed(lambda ids=ids: lm.generate([ids], max_new_tokens))  # type: ignore[misc]
        per_token_s = (full_s - prefill_s) / (max_new_tokens - 1)
        ttft_s, itl_s = served(prompts[i % len(prompts)])
        again_s, _ = served(prompts[i % len(prompts)])
        rows.append(
            {
                "prompt_tokens": len(ids),
                "bare_prefill_ms": prefill_s * 1000,
                "bare_per_token_ms": per_token_s * 1000,
                "ttft_ms": min(ttft_s, again_s) * 1000,
                "ttft_first_ms": ttft_s * 1000,
                "itl_p50_ms": itl_s * 1000,
            }
        )
    return {
        "rounds": rows,
        "ttft_minus_bare_prefill_ms": statistics.median(r["ttft_ms"] - r["bare_prefill_ms"] for r in rows),
        "first_ttft_minus_bare_prefill_ms": statistics.median(r["ttft_first_ms"] - r["bare_prefill_ms"] for r in rows),
        "itl_minus_bare_per_token_ms": statistics.median(r["itl_p50_ms"] - r["bare_per_token_ms"] for r in rows),
    }
