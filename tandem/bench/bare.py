"""The bare model: the same ONNX graph (or, for a model served by the torch backend, the same PyTorch module on the
same device and dtype) with nothing around it (fast tokenizer, the model, pooling) measured in this process, so that
every figure of the load can be compared with what the model alone does on this machine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from services.common.repository import ModelVersion


@dataclass(frozen=True)
class Located:
    """A version and what the bare model runs: its ONNX graph, or (None) its PyTorch module, as the stage does."""

    version: ModelVersion
    onnx: Path | None


class BareModel:
    """The model with nothing around it: fast tokenizer + ONNX Runtime (or the torch backend) + pooling, here.

    `spinning` picks ONNX Runtime's default thread spinning (on) or the inference service's setting (off); the
    benchmark measures both and takes the better one as the ceiling, so Tandem is never compared with a handicapped
    model. A torch-backend model runs in the stage's own TorchBackend (tandem.json's device and dtype: on a GPU when
    the stage would use one), which has no spinning.
    """

    def __init__(self, located: Located, threads: int, spinning: bool) -> None:
        from transformers import AutoTokenizer

        version = located.version
        self.tokenizer = AutoTokenizer.from_pretrained(str(version.path))
        self.max_length = version.max_length
        self.pooling = version.pooling
        self.torch: Any = None
        if located.onnx is None:
            from services.inference.backends.torch import TorchBackend

            self.torch = TorchBackend(version, version.config.device, threads)
            return
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(located.onnx), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
        )
        if self.torch is not None:
            segments = enc.get("token_type_ids")
            hidden = self.torch.run(
                enc["input_ids"].astype(np.int64),
                enc["attention_mask"].astype(np.int64),
                None if segments is None else segments.astype(np.int64),
            )
        else:
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
        located = _locate_model(repository, model)
        self.whole = BareModel(located, threads, True)
        self.side_by_side = (
            [BareModel(located, 1, False) for _ in range(threads)] if threads > 1 and located.onnx is not None else []
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
    located = _locate_model(repository, model)
    if located.onnx is None:
        whole = BareModel(located, threads, False)
        print(f"bare model {model}: torch on {whole.torch.device} ({located.version.config.dtype})", flush=True)
        runs = {False: whole.measure(texts, batch)}
    else:
        print(f"bare model {model}: {located.onnx} ({threads} threads)", flush=True)
        runs = {spinning: BareModel(located, threads, spinning).measure(texts, batch) for spinning in (True, False)}
    bare = max(runs.values(), key=lambda r: r["ceiling_texts_per_s"])
    bare["spinning"] = float(bare is runs.get(True))
    bare["single_p50_ms"] = min(r["single_p50_ms"] for r in runs.values())
    if threads > 1 and located.onnx is not None:
        sessions = [BareModel(located, 1, False) for _ in range(threads)]
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


def _locate_model(repository: Path, model: str) -> Located:
    from services.common.repository import ModelRepository

    version = ModelRepository(repository).resolve(model)
    backend = version.metadata.backend if version.metadata and version.metadata.backend else version.config.backend
    if backend == "torch":
        return Located(version, None)
    onnx = version.path / "model.onnx"
    if not onnx.exists():
        raise SystemExit(f"{onnx} does not exist: start `tandem serve` once so the model is exported")
    return Located(version, onnx)
