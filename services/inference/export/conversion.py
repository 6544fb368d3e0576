"""ONNX graphs derived from an export for `tandem models`: offline-optimised fp32, dynamic int8, and fp16.

Every function writes its result under a temporary name and renames it into place, so a half-written graph is
never seen, and reads only the graph it is given (the exporter itself is export.onnx.export_onnx).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` that becomes `target` when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def optimize_onnx(source: Path, target: Path, threads: int) -> None:
    """ONNX Runtime's extended graph optimisations (fusions of attention, GELU, layer norms, constant folding),
    applied once and saved, so that a session starts from the optimised graph.

    Extended, not "all": the layout rewrites of the highest level are specific to the machine that ran them. The
    fused operators are ONNX Runtime's own, so the result is for ONNX Runtime (CPU or CUDA), not other runtimes.
    """
    import onnxruntime as ort

    with _staged(target) as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(tmp)
        options.intra_op_num_threads = threads
        ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
        if not tmp.is_file():
            raise RuntimeError("ONNX Runtime did not write the optimised graph")


class _QuietPreprocessHint(logging.Filter):
    """quantize_dynamic logs a hint about shape-inference pre-processing on the root logger on every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_int8(source: Path, target: Path, *, per_channel: bool = True) -> None:
    """Dynamic int8 quantisation (onnxruntime.quantization.quantize_dynamic) of the MatMuls with constant weights.

    Weights become int8 (per output channel by default: per-tensor scales cost all-MiniLM-L6-v2 about four points
    of mean cosine similarity); activations are quantised per call from their observed range, so the numbers
    depend a little on what else is in the batch. Matrix products of two activations (attention scores) and the
    embedding tables stay float: quantising them costs much accuracy and little time.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = _QuietPreprocessHint()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        with _staged(target) as tmp:
            quantize_dynamic(
                str(source),
                str(tmp),
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                op_types_to_quantize=["MatMul"],
                extra_options={"MatMulConstBOnly": True},
            )
    finally:
        root.removeFilter(quiet)


def convert_fp16(source: Path, target: Path) -> str:
    """Float16 weights and arithmetic, with float32 inputs and outputs kept (the stage feeds and reads those).

    Uses onnxconverter-common when it is installed, else the same converter as shipped inside onnxruntime;
    returns which one ran. ONNX Runtime's CPU provider runs such a graph through casts, so it is slow there:
    fp16 pays off on GPUs."""
    import onnx

    model = onnx.load(str(source))
    try:
        from onnxconverter_common import float16 as converter  # type: ignore[import-not-found]

        used = "onnxconverter-common"
    except ImportError:
        from onnxruntime.transformers import float16 as converter

        used = "onnxruntime.transformers.float16"
    converted = converter.convert_float_to_float16(model, keep_io_types=True)
    with _staged(target) as tmp:
        onnx.save(converted, str(tmp))
    return used
