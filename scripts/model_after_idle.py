"""The model's own one-text call, back to back against after an idle gap.

`tandem bench` measures the bare model's one-text p50 in a tight loop: each call starts the moment the last one ends,
on cores that never went idle, with ONNX Runtime's threads still spinning. A served call never starts that way: between
two calls of one caller the cores wait for the rest of the round trip (a few milliseconds at one caller). This times the
same ONNX file, pre-tokenized one-text calls only, on the sessions the bench's bare model and the inference stage's
lone-call path use, with idle gaps of 0, 1, 2 and 5 ms between calls, the configurations in turn each round so a change
in the machine's speed hits them alike. Run it on a quiet machine, no server busy:

    .venv/bin/python scripts/model_after_idle.py --model-dir ~/.cache/tandem/repository/all-MiniLM-L6-v2/1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from transformers import AutoTokenizer

from services.inference.backends.onnx import OnnxBackend
from tandem.bench.corpus import make_texts

IntArray = npt.NDArray[np.int64]
CPU = ["CPUExecutionProvider"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="a version folder with model.onnx and tokenizer")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (a lone call's)")
    parser.add_argument("--gaps-ms", default="0,1,2,5", help="idle time between two calls, comma-separated")
    parser.add_argument("--calls", type=int, default=200, help="calls per configuration and round")
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(str(opts.model_dir))
    onnx = opts.model_dir / "model.onnx"
    # The stage's own backend: the bench's bare sessions (threads spinning or not) and the lone-call session (its
    # threads stop spinning after each call), whose calls go through run_alone.
    lone = OnnxBackend(onnx, CPU, threads=1, spinning=True, alone_threads=opts.threads)
    calls = {
        "bare, spinning (the bench's best)": OnnxBackend(onnx, CPU, opts.threads, spinning=True).run,
        "bare, no spinning": OnnxBackend(onnx, CPU, opts.threads, spinning=False).run,
        "stage's lone-call session": lone.run_alone,
    }
    feeds: list[tuple[IntArray, IntArray, IntArray]] = []
    for text in make_texts("short", opts.calls):
        ids = np.asarray(tokenizer([text], return_tensors="np")["input_ids"], dtype=np.int64)
        feeds.append((ids, np.ones_like(ids), np.zeros_like(ids)))
    gaps = [float(g) / 1000 for g in opts.gaps_ms.split(",")]

    def run(call: Callable[[IntArray, IntArray, IntArray], object], gap: float) -> list[float]:
        times = []
        for feed in feeds:
            if gap:
                time.sleep(gap)
            started = time.perf_counter()
            call(*feed)
            times.append(time.perf_counter() - started)
        return times

    for call in calls.values():  # warm-up
        run(call, 0)
    times: dict[tuple[str, float], list[float]] = {(name, gap): [] for name in calls for gap in gaps}
    for _ in range(opts.rounds):
        for gap in gaps:
            for name, call in calls.items():
                times[(name, gap)] += run(call, gap)
    print(f"{opts.threads} thread(s), one short text a call, p50 of {opts.calls} x {opts.rounds} calls in ms")
    print("| session | " + " | ".join(f"gap {gap * 1000:g} ms" for gap in gaps) + " |")
    print("| --- |" + " --- |" * len(gaps))
    for name in calls:
        cells = " | ".join(f"{statistics.median(times[(name, gap)]) * 1000:.2f}" for gap in gaps)
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
