"""The bare model: the same ONNX graph with nothing around it (fast tokenizer, ONNX Runtime, pooling) measured in
this process, so that every figure of the load can be compared with what the model alone does on this machine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


class BareModel:
    """The model with nothing around it: fast tokenizer + ONNX Runtime + pooling, in this process.

    `spinning` picks ONNX Runtime's default thread spinning (on) or the inference service's setting (off); the
    benchmark measures both and takes the better one as the ceiling, so Tandem is never compared with a handicapped
    model.
    """

    def __init__(
        self, version_dir: Path, onnx_path: Path, max_length: int, pooling: str, threads: int, spinning: bool
    ) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(version_dir))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.max_length = max_length
        self.pooling = pooling

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
        )
        feed = {k: v.astype(np.int64) for k, v in enc.items() if k in self.inputs}
        hidden = self.session.run(None, feed)[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        pooled = hidden[:, 0] if self.pooling == "cls" else (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        result: npt.NDArray[np.float32] = (pooled / norms).astype(np.float32)
        return result

    def by_tokens(self, texts: Sequence[str]) -> list[str]:
        """The texts shortest first by token count (what padding depends on), not by characters."""
        counts = [
            len(ids) for ids in self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        ]
        return [text for _, text in sorted(zip(counts, texts, strict=True), key=lambda pair: pair[0])]

    def sorted_rate(self, ordered: Sequence[str], batch: int) -> float:
        """texts/s over texts already sorted by token count, in batches of `batch`."""
        self.embed(ordered[:batch])
        t0 = time.perf_counter()
        for i in range(0, len(ordered), batch):
            self.embed(ordered[i : i + batch])
        return len(ordered) / (time.perf_counter() - t0)

    def measure(self, texts: Sequence[str], batch: int) -> dict[str, float]:
        """texts/s one at a time, in naive batches, and in length-sorted batches; the ceiling is the best."""
        for text in texts[:8]:
            self.embed([text])
        t0 = time.perf_counter()
        latencies = []
        for text in texts:
            s = time.perf_counter()
            self.embed([text])
            latencies.append(time.perf_counter() - s)
        single = len(texts) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch):
            self.embed(texts[i : i + batch])
        naive = len(texts) / (time.perf_counter() - t0)
        sorted_rate = self.sorted_rate(self.by_tokens(texts), batch)
        return {
            "single_texts_per_s": single,
            "single_p50_ms": statistics.median(latencies) * 1000,
            "naive_batch_texts_per_s": naive,
            "sorted_batch_texts_per_s": sorted_rate,
            "ceiling_texts_per_s": max(single, sorted_rate),
        }


def measure_parallel(models: Sequence[BareModel], ordered: Sequence[str], batch: int) -> float:
    """texts/s of batches of texts already sorted by token count, shared out among several sessions running side by
    side, one thread each (ONNX Runtime, the fast tokenizer and numpy release the GIL) — how the inference stage runs
    a model on CPU."""
    import concurrent.futures

    batches = [ordered[i : i + batch] for i in range(0, len(ordered), batch)]
    for model in models:
        model.embed(batches[0])
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        list(pool.map(lambda k: [models[k].embed(b) for b in batches[k :: len(models)]], range(len(models))))
    return len(ordered) / (time.perf_counter() - t0)


class BareBeside:
    """A quick measurement of the bare model's best speed, taken between the cells.

    On a shared machine the speed of the host moves within minutes (on the 2-core development VM, 4 x 32 cells
    against one server gave 334-458 texts/s within ten minutes, with the inference stage's CPU per text moving
    alike), so a ceiling measured once before and once after the grid cannot tell Tandem's overhead from a slow
    moment. Measured between every two cells, each cell is also compared with the bare model of its own moment.
    The two usual winners of the full measurement only: length-sorted batches on one-thread sessions side by side,
    and on one session with every thread; about a second each on the 512-text corpus.
    """

    def __init__(self, repository: Path, model: str, texts: Sequence[str], threads: int, batch: int) -> None:
        version_dir, onnx, max_length, pooling = _locate_model(repository, model)
        self.whole = BareModel(version_dir, onnx, max_length, pooling, threads, True)
        self.side_by_side = (
            [BareModel(version_dir, onnx, max_length, pooling, 1, False) for _ in range(threads)] if threads > 1 else []
        )
        self.ordered = self.whole.by_tokens(texts)
        self.batch = batch

    def measure(self) -> float:
        rate = self.whole.sorted_rate(self.ordered, self.batch)
        if self.side_by_side:
            rate = max(rate, measure_parallel(self.side_by_side, self.ordered, self.batch))
        return rate


def measure_bare(repository: Path, model: str, texts: Sequence[str], threads: int, batch: int) -> dict[str, float]:
    """The model's own speed on these texts, at its best: one session using every thread (ONNX Runtime's thread
    spinning on and off), and `threads` single-thread sessions side by side. The ceiling is the fastest of all."""
    version_dir, onnx, max_length, pooling = _locate_model(repository, model)
    print(f"bare model {model}: {onnx} ({threads} threads)", flush=True)
    runs = {
        spinning: BareModel(version_dir, onnx, max_length, pooling, threads, spinning).measure(texts, batch)
        for spinning in (True, False)
    }
    bare = max(runs.values(), key=lambda r: r["ceiling_texts_per_s"])
    bare["spinning"] = float(bare is runs[True])
    bare["single_p50_ms"] = min(r["single_p50_ms"] for r in runs.values())
    if threads > 1:
        sessions = [BareModel(version_dir, onnx, max_length, pooling, 1, False) for _ in range(threads)]
        bare["sorted_parallel_texts_per_s"] = measure_parallel(sessions, sessions[0].by_tokens(texts), batch)
        bare["ceiling_texts_per_s"] = max(bare["ceiling_texts_per_s"], bare["sorted_parallel_texts_per_s"])
    print(
        "bare: one at a time {single_texts_per_s:.1f} texts/s (p50 {single_p50_ms:.2f} ms); "
        "batches of {b}: naive {naive_batch_texts_per_s:.1f}, length-sorted {sorted_batch_texts_per_s:.1f}, "
        "length-sorted on {threads} one-thread sessions {parallel:.1f} texts/s; "
        "ceiling {ceiling_texts_per_s:.1f}".format(
            b=batch, threads=threads, parallel=bare.get("sorted_parallel_texts_per_s", float("nan")), **bare
        ),
        flush=True,
    )
    return bare


def combine_bare(runs: Sequence[dict[str, float]]) -> dict[str, Any]:
    """The best of several measurements of the bare model (before and after the cells): the highest rates and the
    lowest one-text p50, so that a slow moment of the machine while the bare model ran never flatters the ratios."""
    best: dict[str, Any] = {key: max(run[key] for run in runs) for key in runs[0] if key.endswith("_per_s")}
    best["single_p50_ms"] = min(run["single_p50_ms"] for run in runs)
    best["spinning"] = max(runs, key=lambda run: run["ceiling_texts_per_s"])["spinning"]
    best["measurements"] = list(runs)
    return best


def _locate_model(repository: Path, model: str) -> tuple[Path, Path, int, str]:
    from services.common.repository import ModelRepository

    version = ModelRepository(repository).resolve(model)
    onnx = version.path / "model.onnx"
    if not onnx.exists():
        raise SystemExit(f"{onnx} does not exist: start `tandem serve` once so the model is exported")
    return version.path, onnx, version.max_length, version.pooling
