"""In-process speed of versions on CPU: median milliseconds per text, one text at a time and in padded batches,
with the backend serving uses (the ONNX graph for encoders, PyTorch for text generation), and the size on disk of
what that backend loads. `tandem models speed` prints these; derived versions record them against their parent."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.repository import ModelVersion, SpeedReport, Task
from services.inference.backends.base import Backend

Runner = Callable[[list[str]], None]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def encoder_runner(backend: Backend, tokenizer: Any, max_length: int) -> Runner:
    def run(batch: list[str]) -> None:
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        types = enc.get("token_type_ids")
        backend.run(
            enc["input_ids"].astype(np.int64),
            enc["attention_mask"].astype(np.int64),
            None if types is None or not backend.uses_token_type_ids else types.astype(np.int64),
        )

    return run


def generation_runner(model: torch.nn.Module, tokenizer: Any, max_length: int) -> Runner:
    """One forward pass over the prompts (what prefill costs), as the torch backend runs it."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    def run(batch: list[str]) -> None:
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])

    return run


def ms_per_text(run: Runner, texts: Sequence[str], batch_size: int, repeats: int) -> tuple[float, float]:
    """(median ms per text one at a time, median ms per text in batches of batch_size); each shape is run once to
    warm up before it is timed. Only full batches are timed, unless there are too few texts for one."""

    def timed(batch: list[str]) -> float:
        run(batch)
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            run(batch)
            samples.append(time.perf_counter() - started)
        return statistics.median(samples) * 1000 / len(batch)

    single = statistics.median(timed([t]) for t in texts)
    batches = [list(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    batched = statistics.median(timed(b) for b in batches if len(b) == batch_size or len(batches) == 1)
    return single, batched


def size_on_disk(files: Sequence[Path]) -> int:
    return sum(f.stat().st_size for f in files if f.is_file())


def weight_files(folder: Path) -> list[Path]:
    return [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]


def cached_graph(model: ModelVersion, home: Path, threads: int) -> Path:
    """The version's ONNX graph: beside its files, or in the cache under `home`, exported into the cache when there
    is none (so measuring a parent never writes into the repository)."""
    from services.inference.export.onnx import export_onnx, onnx_locations

    beside, cached = onnx_locations(model, home)
    for path in (beside, cached):
        if path.is_file():
            return path
    export_onnx(model, cached, threads)
    return cached


def measure(
    model: ModelVersion, graph: Path | None, texts: Sequence[str], threads: int, batch_size: int, repeats: int
) -> tuple[float, float, int]:
    """(ms per text single, ms per text batched, bytes) of a version: its ONNX graph `graph` for encoders, its
    Hugging Face weights through PyTorch for text generation."""
    from transformers import AutoTokenizer

    from services.inference.backends.onnx import cpu_backend
    from services.inference.backends.torch import load_hf_model

    tokenizer = AutoTokenizer.from_pretrained(str(model.path))
    if model.task is Task.TEXT_GENERATION or graph is None:
        torch.set_num_threads(threads)
        hf = load_hf_model(model)
        runner = (generation_runner if model.task is Task.TEXT_GENERATION else _torch_encoder_runner)(
            hf, tokenizer, model.max_length
        )
        single, batched = ms_per_text(runner, texts, batch_size, repeats)
        return single, batched, size_on_disk(weight_files(model.path))
    backend = cpu_backend(graph, threads)
    try:
        single, batched = ms_per_text(encoder_runner(backend, tokenizer, model.max_length), texts, batch_size, repeats)
    finally:
        backend.close()
    return single, batched, size_on_disk([graph])


def _torch_encoder_runner(model: torch.nn.Module, tokenizer: Any, max_length: int) -> Runner:
    def run(batch: list[str]) -> None:
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            model(**enc)

    return run


def speed_report(
    candidate: tuple[ModelVersion, Path | None],
    parent: tuple[ModelVersion, Path | None],
    texts: Sequence[str],
    threads: int,
    batch_size: int = 32,
    repeats: int = 3,
) -> SpeedReport:
    """Candidate and parent measured one after the other in this process: (version, ONNX graph or None) each."""
    single, batched, size = measure(*candidate, texts, threads, batch_size, repeats)
    p_single, p_batched, p_size = measure(*parent, texts, threads, batch_size, repeats)
    return SpeedReport(
        parent=parent[0].ref,
        texts=len(texts),
        threads=threads,
        batch_size=batch_size,
        ms_per_text_single=round(single, 4),
        parent_ms_per_text_single=round(p_single, 4),
        ms_per_text_batch=round(batched, 4),
        parent_ms_per_text_batch=round(p_batched, 4),
        size_bytes=size,
        parent_size_bytes=p_size,
    )
