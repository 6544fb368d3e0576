"""The Rust tokenizer's encode_batch against encode_batch_fast on the bench's short texts (median microseconds).

.venv/bin/python docs/benchmarks/2026-12-05/tokenizer-fast/encode_speed.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import tokenizers

from tandem.bench.corpus import make_texts

TOKENIZER = Path.home() / ".cache/tandem/repository/all-MiniLM-L6-v2/1/tokenizer.json"


def median_us(encode: Callable[[Sequence[str]], object], texts: Sequence[str], batch: int) -> float:
    times = []
    for r in range(300):
        start = (r * batch) % 4000
        chunk = texts[start : start + batch]
        began = time.perf_counter()
        encode(chunk)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e6


def main() -> None:
    tokenizer = tokenizers.Tokenizer.from_file(str(TOKENIZER))
    tokenizer.no_padding()
    tokenizer.enable_truncation(256)
    texts = make_texts("short", 4096)
    print(tokenizers.__version__)
    for _ in range(2):
        print("encode_batch 32", median_us(tokenizer.encode_batch, texts, 32))
        print("encode_batch_fast 32", median_us(tokenizer.encode_batch_fast, texts, 32))
        print("encode_batch 1", median_us(tokenizer.encode_batch, texts, 1))
        print("encode 1", median_us(lambda b: tokenizer.encode(b[0]), texts, 1))
        print("encode_batch_fast 1", median_us(tokenizer.encode_batch_fast, texts, 1))


if __name__ == "__main__":
    main()
