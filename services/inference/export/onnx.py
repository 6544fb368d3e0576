"""ONNX export of a version's Hugging Face model, checked against PyTorch, and where its graph is kept."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from services.common.repository import ModelVersion, Task
from services.inference.backends.base import FloatArray, IntArray, output_name, token_level
from services.inference.backends.onnx import cpu_backend
from services.inference.backends.torch import load_hf_model, wrap_single_output

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
# Largest ONNX-vs-PyTorch difference an export may show before it is refused.
EXPORT_TOLERANCE = 1e-3


class ExportError(ValueError):
    """The exported graph does not reproduce the PyTorch model."""


def _sample_batches(model: ModelVersion) -> list[tuple[IntArray, IntArray, IntArray]]:
    """Padded batches for export and its check: sequences of different lengths, so padding is exercised."""
    vocab = int(model.hf_config.get("vocab_size", 100) or 100)
    segments = max(1, int(model.hf_config.get("type_vocab_size", 1) or 1))
    rng = np.random.default_rng(0)
    batches = []
    for wanted in ((16, 9), (7, 3, 5)):
        lengths = [min(n, model.max_length) for n in wanted]
        width = max(lengths)
        ids = np.zeros((len(lengths), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for row, length in enumerate(lengths):
            ids[row, :length] = rng.integers(0, vocab, size=length)
            mask[row, :length] = 1
            if segments > 1:
                types[row, length // 2 : length] = 1
        batches.append((ids, mask, types))
    return batches


def _max_diff(task: Task, reference: FloatArray, got: FloatArray, mask: IntArray) -> float:
    if reference.shape != got.shape:
        return float("inf")
    if token_level(task):
        keep = mask.astype(bool)
        # Padded positions carry no meaning and are never served; only real tokens are compared.
        return float(np.max(np.abs(reference[keep] - got[keep])))
    return float(np.max(np.abs(reference - got)))


def export_onnx(model: ModelVersion, target: Path, threads: int) -> None:
    """Exports a version folder's Hugging Face model to `target` with the dynamo exporter, checked against PyTorch.

    The legacy TorchScript exporter gives silently wrong outputs with transformers 5, hence dynamo only. The file
    appears by atomic rename, so concurrent loaders never read half a graph; it is refused (ExportError) when
    ONNX Runtime and PyTorch disagree by more than EXPORT_TOLERANCE on a sample batch.
    """
    torch.set_num_threads(threads)
    wrapper, takes_segments = wrap_single_output(load_hf_model(model), model.task)
    names = ["input_ids", "attention_mask", *(["token_type_ids"] if takes_segments else [])]
    batches = _sample_batches(model)
    ids, mask, types = batches[0]
    args = tuple(torch.from_numpy(a) for a in (ids, mask, types)[: len(names)])
    batch_dim, sequence_dim = torch.export.Dim("batch"), torch.export.Dim("sequence")
    started = time.perf_counter()
    program = torch.onnx.export(
        wrapper,
        args,
        dynamo=True,
        input_names=names,
        output_names=[output_name(model.task)],
        dynamic_shapes={name: {0: batch_dim, 1: sequence_dim} for name in names},
        verbose=False,
    )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        # One self-contained file: external data would be tied to the temporary name. Limits exports to 2 GB.
        program.save(str(tmp), external_data=False)
        session = cpu_backend(tmp, threads)
        worst = 0.0
        with torch.inference_mode():
            for ids, mask, types in batches:
                inputs = tuple(torch.from_numpy(a) for a in (ids, mask, types)[: len(names)])
                reference = wrapper(*inputs).float().numpy()
                got = session.run(ids, mask, types if takes_segments else None)
                worst = max(worst, _max_diff(model.task, reference, got, mask))
        del session
        if not worst < EXPORT_TOLERANCE:
            raise ExportError(f"ONNX export differs from PyTorch by {worst:.2e} (limit {EXPORT_TOLERANCE:.0e})")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info(
        "exported %s:%s to %s in %.1fs (max abs diff %.1e)",
        model.name,
        model.version,
        target,
        time.perf_counter() - started,
        worst,
    )


def onnx_locations(model: ModelVersion, home: Path) -> tuple[Path, Path]:
    """(beside the Hugging Face files, in the cache): where a version's ONNX graph is looked for, in that order."""
    return model.path / ONNX_FILE, home / "onnx-cache" / model.name / model.version / ONNX_FILE


def _writable(folder: Path) -> bool:
    """Whether a file can be created in `folder`: tried for real, as os.access says yes to root on read-only mounts."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tandem-probe-"):
            return True
    except OSError:
        return False


def ensure_onnx(model: ModelVersion, home: Path, threads: int) -> tuple[Path, bool]:
    """(path of the version's ONNX graph, whether it was exported just now); exports when there is none yet.

    The graph goes beside the Hugging Face files when that folder is writable, else into the cache under `home`.
    """
    beside, cached = onnx_locations(model, home)
    for path in (beside, cached):
        if path.is_file():
            return path, False
    target = beside if _writable(model.path) else cached
    export_onnx(model, target, threads)
    return target, True
