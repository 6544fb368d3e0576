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
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from transformers import AutoTokenizer

from tandem.bench.corpus import make_texts

Feed = dict[str, npt.NDArray[np.int64]]


def session(path: Path, threads: int, spinning: bool, stop_spinning: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if stop_spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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
    sessions = {
        "bare, spinning (the bench's best)": session(onnx, opts.threads, True, False),
        "bare, no spinning": session(onnx, opts.threads, False, False),
        "stage's lone-call session": session(onnx, opts.threads, True, True),
    }
    names = {i.name for i in next(iter(sessions.values())).get_inputs()}
    feeds: list[Feed] = [
        {k: np.asarray(v, dtype=np.int64) for k, v in tokenizer([text], return_tensors="np").items() if k in names}
        for text in make_texts("short", opts.calls)
    ]
    gaps = [float(g) / 1000 for g in opts.gaps_ms.split(",")]

    def run(s: ort.InferenceSession, gap: float) -> list[float]:
        times = []
        for feed in feeds:
            if gap:
                time.sleep(gap)
            started = time.perf_counter()
            s.run(None, feed)
            times.append(time.perf_counter() - started)
        return times

    for s in sessions.values():  # warm-up
        run(s, 0)
    times: dict[tuple[str, float], list[float]] = {(name, gap): [] for name in sessions for gap in gaps}
    for _ in range(opts.rounds):
        for gap in gaps:
            for name, s in sessions.items():
                times[(name, gap)] += run(s, gap)
    print(f"{opts.threads} thread(s), one short text a call, p50 of {opts.calls} x {opts.rounds} calls in ms")
    print("| session | " + " | ".join(f"gap {gap * 1000:g} ms" for gap in gaps) + " |")
    print("| --- |" + " --- |" * len(gaps))
    for name in sessions:
        cells = " | ".join(f"{statistics.median(times[(name, gap)]) * 1000:.2f}" for gap in gaps)
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
