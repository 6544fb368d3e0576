"""The model alone on `tandem bench`'s multi-text requests, by how its calls are composed.

`tandem bench`'s ceiling for a cell of 32-text requests sorts the whole corpus by length and runs batches of 32 on
one-thread sessions side by side: no server can do that, since it sees only the requests in flight. This runs the same
ONNX file on the same corpus, pre-tokenized (only the model calls are timed), on one-thread sessions side by side
(one per `--instances`), with the calls composed as the inference stage's batcher would compose them from rounds of 1,
2 or 4 requests (services/inference/batching/planner.cut, at the stage's measured cost per call), against the
ceiling's composition and against one unsorted call per request. It tells how much of a cell's gap to the ceiling
is the requests' composition rather than the pipeline's overhead. Run it on a quiet machine, no server busy:

    .venv/bin/python scripts/batch_composition.py --model-dir ~/.cache/tandem/repository/all-MiniLM-L6-v2/1
"""

from __future__ import annotations

import argparse
import queue
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from transformers import AutoTokenizer

from services.common.repository.config import ModelConfig, Task
from services.inference.backends.onnx import OnnxBackend
from services.inference.batching.planner import cut
from tandem.bench.corpus import make_texts

Rows = npt.NDArray[np.intp]
Feed = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]
CPU = ["CPUExecutionProvider"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="a version folder with model.onnx and tokenizer")
    parser.add_argument("--texts", type=int, default=2048, help="corpus size (the bench's texts per cell)")
    parser.add_argument("--texts-per-request", type=int, default=32)
    parser.add_argument("--instances", type=int, default=2, help="one-thread sessions side by side")
    parser.add_argument("--call-cost-tokens", type=float, default=22.0, help="the stage's logged cost per call")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--round-requests", default="4,2,1", help="requests a round takes, comma-separated (one kind each)"
    )
    parser.add_argument(
        "--ceiling-batch",
        type=int,
        default=0,
        help="the ceiling's batch (the bench's --bare-batch, 32; 0: one request's texts)",
    )
    opts = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(str(opts.model_dir))
    ids: list[list[int]] = tokenizer(make_texts("short", opts.texts))["input_ids"]
    lengths = np.array([len(row) for row in ids], dtype=np.int64)
    config = ModelConfig(task=Task.EMBEDDING)
    n = opts.texts_per_request

    # The stage's own backend, one thread a session, as an instance runs (its threads do not spin on 2 shared cores).
    onnx = opts.model_dir / "model.onnx"
    sessions = [OnnxBackend(onnx, CPU, threads=1, spinning=False) for _ in range(opts.instances)]

    def feed(rows: Rows) -> Feed:
        width = int(lengths[rows].max())
        input_ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros_like(input_ids)
        for k, r in enumerate(rows):
            input_ids[k, : lengths[r]] = ids[r]
            mask[k, : lengths[r]] = 1
        return input_ids, mask, np.zeros_like(input_ids)

    order = np.arange(len(lengths))

    def plan(kind: str) -> list[Rows]:
        if kind == "ceiling: corpus sorted":
            by_length = np.argsort(lengths, kind="stable")
            size = opts.ceiling_batch or n
            return [by_length[i : i + size] for i in range(0, len(by_length), size)]
        if kind == "one unsorted call a request":
            return [order[i : i + n] for i in range(0, len(order), n)]
        per = n * int(kind.split()[2])  # "rounds of K request(s)"
        calls: list[Rows] = []
        for i in range(0, len(order), per):
            part = order[i : i + per]
            calls += [part[c] for c in cut(lengths[part], config, opts.call_cost_tokens)]
        return calls

    def run(calls: list[Rows]) -> float:
        work: queue.SimpleQueue[Feed] = queue.SimpleQueue()
        for call in calls:
            work.put(feed(call))

        def worker(s: OnnxBackend) -> None:
            while True:
                try:
                    inputs = work.get_nowait()
                except queue.Empty:
                    return
                s.run(*inputs)

        started = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(s,)) for s in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return len(lengths) / (time.perf_counter() - started)

    rounds = [int(k) for k in opts.round_requests.split(",")]
    kinds = [
        "ceiling: corpus sorted",
        *(f"rounds of {k} request{'s' if k > 1 else ''}" for k in rounds),
        "one unsorted call a request",
    ]
    run(plan(kinds[-1]))  # warm-up
    speeds: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(opts.rounds):  # in turn, so a change in the machine's speed hits every kind alike
        for kind in kinds:
            speeds[kind].append(run(plan(kind)))
    ceiling = statistics.median(speeds[kinds[0]])
    print(f"{len(lengths)} texts, {n} a request, {opts.instances} one-thread sessions; medians of {opts.rounds} rounds")
    for kind in kinds:
        calls = plan(kind)
        padded = sum(len(c) * int(lengths[c].max()) for c in calls) / int(lengths.sum())
        speed = statistics.median(speeds[kind])
        print(f"{kind:28s} {speed:7.1f} texts/s x{speed / ceiling:.3f} ({len(calls)} calls, {padded:.3f} padded/real)")


if __name__ == "__main__":
    main()
