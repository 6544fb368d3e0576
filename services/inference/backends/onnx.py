"""ONNX Runtime backend: the session options, execution providers (TensorRT, CUDA, CPU) and I/O binding."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.common.repository import ModelVersion
from services.inference.backends.base import (
    GPU_PROVIDERS,
    INPUT_NAMES,
    Backend,
    FloatArray,
    IntArray,
    cuda_present,
)

log = logging.getLogger(__name__)


def onnx_providers(device: str, model: ModelVersion, home: Path, graph: Path) -> list[str | tuple[str, dict[str, Any]]]:
    """ONNX Runtime providers for a device setting, best first; CPU is always the last resort."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = set(ort.get_available_providers())
    # onnxruntime-gpu lists its GPU providers even on machines without a GPU; ask the driver too.
    gpu = bool(available & set(GPU_PROVIDERS)) and cuda_present()
    providers: list[str | tuple[str, dict[str, Any]]] = []
    if gpu and "TensorrtExecutionProvider" in available:
        # One explicit shape profile up to the batcher's limits, so TensorRT builds its engine once, not per shape.
        rows, cols = model.config.max_batch_size, model.max_length
        shapes = {"min": (1, 1), "opt": (rows, min(cols, 128)), "max": (rows, cols)}
        cache = home / "trt-cache" / model.name / model.version
        cache.mkdir(parents=True, exist_ok=True)
        trt: dict[str, Any] = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
        for kind, (r, c) in shapes.items():
            trt[f"trt_profile_{kind}_shapes"] = ",".join(f"{name}:{r}x{c}" for name in onnx_inputs(graph))
        providers.append(("TensorrtExecutionProvider", trt))
    if gpu and "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")
    if device == "cuda" and not providers:
        raise ValueError("device 'cuda' is set but onnxruntime has no usable GPU (needs onnxruntime-gpu and a GPU)")
    providers.append("CPUExecutionProvider")
    return providers


def onnx_inputs(path: Path) -> list[str]:
    """Names of a graph's inputs, read without loading its weights."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers]


class OnnxBackend(Backend):
    """ONNX Runtime session; the inputs it feeds are the ones the graph declares."""

    name = "onnxruntime"

    def __init__(
        self,
        path: Path,
        providers: Sequence[str | tuple[str, dict[str, Any]]],
        threads: int,
        spinning: bool = True,
        alone_threads: int = 0,
        io_binding: bool | None = None,
    ) -> None:
        import onnxruntime as ort

        def session(intra_op_threads: int, stop_spinning: bool = False) -> ort.InferenceSession:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = intra_op_threads
            # Parallelism lives inside the operators; calls side by side (instances) share the session.
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            # See BackendOptions.spinning for the trade-off.
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
            if stop_spinning:
                options.add_session_config_entry("session.force_spinning_stop", "1")
            return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))

        self.path = path
        self.session = session(threads)
        # Instances split the threads, so a call with the machine to itself would use only its share: a second
        # session on all of them serves such calls (a second copy of the weights; see BackendOptions.alone_threads_of).
        # Its threads stop spinning as each call ends, so that they never take cycles from the calls that follow:
        # with spinning left on, 4 x 32 texts end to end fell from 457 to 375 texts/s.
        self._alone = session(alone_threads, stop_spinning=True) if alone_threads > threads else None
        self.runs_alone = self._alone is not None
        declared = {i.name: i.type for i in self.session.get_inputs()}
        unknown = sorted(set(declared) - set(INPUT_NAMES))
        if "input_ids" not in declared or unknown:
            raise ValueError(
                f"{path.name} takes inputs {sorted(declared)}; expected input_ids[, attention_mask, token_type_ids]"
            )
        # Graphs exported by other tools sometimes take int32 ids.
        self._dtypes = {n: np.int32 if t == "tensor(int32)" else np.int64 for n, t in declared.items()}
        self.uses_token_type_ids = "token_type_ids" in declared
        outputs = [o.name for o in self.session.get_outputs()]
        preferred = [n for n in ("logits", "last_hidden_state") if n in outputs]
        self._output = preferred[0] if preferred else outputs[0]
        self.providers: list[str] = list(self.session.get_providers())
        # I/O binding (default: on a GPU): the inputs are bound from host memory, the output is left on the device
        # the graph ran on and copied back once, instead of session.run's per-call feed and fetch handling. None
        # when off; a binding that fails on the first call (warm-up) turns itself off with a warning.
        on_gpu = self.providers[0] in GPU_PROVIDERS
        self._bind_device: str | None = None
        if io_binding or (io_binding is None and on_gpu):
            self._bind_device = "cuda" if on_gpu else "cpu"
        self._binding_proven = False

    @property
    def io_binding(self) -> bool:
        return self._bind_device is not None

    def run(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        return self._run(self.session, input_ids, attention_mask, token_type_ids)

    def run_alone(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        return self._run(self._alone or self.session, input_ids, attention_mask, token_type_ids)

    def _run(
        self, session: Any, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None
    ) -> FloatArray:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed: dict[str, Any] = {}
        for name, dtype in self._dtypes.items():
            value = given[name]
            feed[name] = np.zeros_like(input_ids, dtype=dtype) if value is None else value.astype(dtype, copy=False)
        if self._bind_device is not None:
            try:
                out = self._run_bound(session, feed, self._bind_device)
            except Exception:
                if self._binding_proven:
                    raise
                log.warning("I/O binding failed on %s; running without it", self.path, exc_info=True)
                self._bind_device = None
            else:
                self._binding_proven = True
                return out
        out = session.run([self._output], feed)[0]
        return np.asarray(out, dtype=np.float32)

    def _run_bound(self, session: Any, feed: dict[str, Any], device: str) -> FloatArray:
        binding = session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output(self._output, device)
        session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)


def cpu_backend(path: Path, threads: int) -> OnnxBackend:
    """A graph on ONNX Runtime's CPU provider alone: how exports are checked and derived versions measured."""
    return OnnxBackend(path, ["CPUExecutionProvider"], threads)
