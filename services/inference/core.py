"""Inference domain: ragged token batches to model outputs with ONNX Runtime or PyTorch, batched per model version."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import inspect
import logging
import os
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from opentelemetry import trace

from services.common import errors, tensors, timing, tracing
from services.common.pooling import check_pooling, pool_padded
from services.common.repository import (
    DEFAULT_ALIAS,
    METADATA_FILE,
    MODEL_BROKEN,
    MODEL_CONFIG_INVALID,
    MODEL_NOT_LOADED,
    TOKENIZER_MISMATCH,
    AccuracyReport,
    Listing,
    ModelConfig,
    ModelRepository,
    ModelVersion,
    Task,
    VersionPolicy,
    check_alias,
    parse_reference,
    tokenizer_fingerprint,
)
from services.common.settings import usable_cpus

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

ONNX_FILE = "model.onnx"
# Largest ONNX-vs-PyTorch difference an export may show before it is refused.
EXPORT_TOLERANCE = 1e-3
_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def token_level(task: Task) -> bool:
    """Token-level tasks answer one row per token; the others one row per sequence."""
    return task in (Task.EMBEDDING, Task.TOKEN_CLASSIFICATION)


def _output_name(task: Task) -> str:
    return "last_hidden_state" if task is Task.EMBEDDING else "logits"


# ----------------------------------------------------------------------------------------------------------------------
# Backends


class Backend(ABC):
    """A loaded model: padded int64 batches in, one float32 array out. Called from the batcher's instance threads,
    one call per instance at a time (so run and run_alone may run at once)."""

    name: str
    uses_token_type_ids: bool
    # True when run_alone is faster than run for a call that has the machine to itself (see OnnxBackend).
    runs_alone: bool = False

    @abstractmethod
    def run(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        """[b, s] inputs -> [b, s, h] (token-level tasks) or [b, L] (sequence-level tasks)."""

    def run_alone(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        """The same as run, for a call that had the model to itself when it started: may use every thread."""
        return self.run(input_ids, attention_mask, token_type_ids)

    @property
    def io_binding(self) -> bool:
        """Whether calls run with ONNX Runtime's I/O binding (see OnnxBackend)."""
        return False

    def close(self) -> None:
        """Frees what the backend holds; the default has nothing to free."""
        return None


@dataclass(frozen=True)
class BackendOptions:
    """Process-wide choices that every backend shares."""

    home: Path
    intra_op_threads: int
    # Overrides every model's tandem.json "device" when set.
    device: str | None = None
    # ONNX Runtime's pool threads spin briefly for the next piece of work. Measured on 2 quiet cores with MiniLM,
    # one text: 3.9 ms with spinning, 7.5 ms without; on cores shared with busy neighbours spinning can cost more
    # than it saves, so it can be turned off (--no-intra-op-spinning).
    spinning: bool = True
    # Overrides every model's tandem.json "instances" when set.
    instances: int | None = None
    # Overrides every model's tandem.json "run_alone" when set.
    run_alone: bool | None = None

    def instances_of(self, model: ModelVersion) -> int:
        """Model calls that run at once for this version: the stage's override, tandem.json's, or by device.

        On CPU two calls of half the threads each run side by side: measured with all-MiniLM-L6-v2 on 2 cores,
        batches of 16-32, 396-447 texts/s against 321-407 for one two-thread call at a time, and far less lost to
        busy neighbours (no thread waits at a barrier for one that was preempted). One text alone takes longer
        (5.0 ms against 3.0 ms), so a latency-bound deployment sets instances to 1.
        """
        configured = self.instances or model.config.instances
        if configured:
            return configured
        return 2 if self._on_cpu(model) and self.intra_op_threads >= 2 else 1

    def _on_cpu(self, model: ModelVersion) -> bool:
        device = self.device or model.config.device
        return device == "cpu" or (device == "auto" and not _cuda_present())

    def threads_of(self, model: ModelVersion) -> int:
        """Threads inside one model call: the stage's threads shared out among the version's instances."""
        return max(1, self.intra_op_threads // self.instances_of(model))

    def alone_threads_of(self, model: ModelVersion) -> int:
        """Threads of a call that has the model to itself (0: no separate session, it runs like any other).

        On CPU with instances splitting the threads, a lone call gets all of them. Measured end to end on 2 cores
        (all-MiniLM-L6-v2, `tandem serve`, alternating runs): one text at a time p50 9.9-10.8 ms against 11.8-14.5
        without; mixed-length texts 12.7-13.2 against 16.3-16.4; throughput at 4 x 1, 32 x 1 and 4 x 32 unchanged
        within the runs' noise.
        """
        alone = model.config.run_alone if self.run_alone is None else self.run_alone
        if alone is False or self.threads_of(model) >= self.intra_op_threads or not self._on_cpu(model):
            return 0
        return self.intra_op_threads


_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _cuda_present() -> bool:
    return bool(torch.cuda.is_available())


def onnx_providers(device: str, model: ModelVersion, home: Path, graph: Path) -> list[str | tuple[str, dict[str, Any]]]:
    """ONNX Runtime providers for a device setting, best first; CPU is always the last resort."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = set(ort.get_available_providers())
    # onnxruntime-gpu lists its GPU providers even on machines without a GPU; ask the driver too.
    gpu = bool(available & set(_GPU_PROVIDERS)) and _cuda_present()
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
        unknown = sorted(set(declared) - set(_INPUT_NAMES))
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
        on_gpu = self.providers[0] in _GPU_PROVIDERS
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


class _SingleOutput(torch.nn.Module):
    """A Hugging Face model reduced to one tensor out, called with keyword arguments.

    Keywords because the positional order of forward() differs between architectures; a single tensor because
    that is all the stage serves, and it gives the ONNX graph exactly one output.
    """

    def __init__(self, model: torch.nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        result = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return getattr(result, self.output)  # type: ignore[no-any-return]


class _SingleOutputNoSegments(torch.nn.Module):
    """The same for models whose forward() takes no token_type_ids (DistilBERT and the like)."""

    def __init__(self, model: torch.nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        result = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return getattr(result, self.output)  # type: ignore[no-any-return]


def load_hf_model(model: ModelVersion) -> torch.nn.Module:
    """The Hugging Face model of a version folder, in eval mode and float32, with the Auto class of its task."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    auto: Any = {
        Task.EMBEDDING: AutoModel,
        Task.CLASSIFICATION: AutoModelForSequenceClassification,
        Task.RERANK: AutoModelForSequenceClassification,
        Task.TOKEN_CLASSIFICATION: AutoModelForTokenClassification,
    }[model.task]
    hf = auto.from_pretrained(str(model.path), dtype=torch.float32, local_files_only=True)
    hf.eval()
    return hf  # type: ignore[no-any-return]


def wrap_single_output(hf: torch.nn.Module, task: Task) -> tuple[torch.nn.Module, bool]:
    """(module with forward(input_ids, attention_mask[, token_type_ids]), whether it takes token_type_ids)."""
    takes_segments = "token_type_ids" in inspect.signature(hf.forward).parameters
    wrapper_type = _SingleOutput if takes_segments else _SingleOutputNoSegments
    return wrapper_type(hf, _output_name(task)).eval(), takes_segments


class TorchBackend(Backend):
    """PyTorch eager with inference_mode; on CUDA when one is present and the device setting allows."""

    name = "torch"

    def __init__(self, model: ModelVersion, device: str, threads: int) -> None:
        if device == "cuda" and not _cuda_present():
            raise ValueError("device 'cuda' is set but torch sees no CUDA GPU")
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if device != "cpu" and _cuda_present() else "cpu")
        module, self.uses_token_type_ids = wrap_single_output(load_hf_model(model), model.task)
        self.module = module.to(self.device)

    def run(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        with torch.inference_mode():
            args = [torch.from_numpy(input_ids).to(self.device), torch.from_numpy(attention_mask).to(self.device)]
            if self.uses_token_type_ids:
                segments = np.zeros_like(input_ids) if token_type_ids is None else token_type_ids
                args.append(torch.from_numpy(segments).to(self.device))
            out = self.module(*args)
            return out.float().cpu().numpy()  # type: ignore[no-any-return]

    def close(self) -> None:
        del self.module
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# ONNX export


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
        output_names=[_output_name(model.task)],
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
        session = OnnxBackend(tmp, ["CPUExecutionProvider"], threads)
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


def create_backend(model: ModelVersion, options: BackendOptions) -> Backend:
    """The backend tandem.json names, on the device the settings and the model allow."""
    device = options.device or model.config.device
    threads = options.threads_of(model)
    if model.config.backend == "torch":
        return TorchBackend(model, device, threads)
    path, _ = ensure_onnx(model, options.home, options.intra_op_threads)
    providers = onnx_providers(device, model, options.home, path)
    return OnnxBackend(path, providers, threads, options.spinning, options.alone_threads_of(model))


BackendFactory = Callable[[ModelVersion, BackendOptions], Backend]


# ----------------------------------------------------------------------------------------------------------------------
# Dynamic batching


def lower_priority(nice: int) -> None:
    """Makes the calling thread `nice` steps less urgent (Linux: niceness is per thread, and inherited by the
    threads it starts). Model threads run niced so that the event loop beside them — admission, health, the
    refusals that must come back fast — and the light stages on the same cores are served first."""
    if nice > 0 and hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            os.setpriority(
                os.PRIO_PROCESS, threading.get_native_id(), min(os.getpriority(os.PRIO_PROCESS, 0) + nice, 19)
            )


# What a batcher assumes a model call costs, in padded tokens, when nobody measured it (the stage measures each
# version as it loads: CPU models come out at 5-15, GPU models far higher).
DEFAULT_CALL_COST_TOKENS = 16.0


class BatchObserver(Protocol):
    """Where a batcher reports how long requests queued and each model call (the stage's metrics)."""

    def queued(self, seconds: float) -> None: ...

    def batch(self, rows: int, padded_tokens: int, seconds: float) -> None: ...


class _Unobserved:
    def queued(self, seconds: float) -> None:
        return None

    def batch(self, rows: int, padded_tokens: int, seconds: float) -> None:
        return None


@dataclass(eq=False)
class _Request:
    """One caller's ragged batch and, once computed, its output rows."""

    input_ids: IntArray
    token_type_ids: IntArray | None
    starts: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]
    deadline: float | None
    future: asyncio.Future[FloatArray]
    remaining: int
    output: FloatArray | None = None
    # The caller's span (model.run spans hang under the first caller's and link the others) and its wait here.
    caller: trace.Span = trace.INVALID_SPAN
    queued: trace.Span = trace.INVALID_SPAN
    # perf_counter when queued and when its first model call started, and the seconds of the calls it rode in.
    queued_at: float = 0.0
    started_at: float | None = None
    compute_s: float = 0.0
    # Answer one pooled row per sequence instead of its token rows (InferRequest.pool on an embedding model).
    pool: bool = False

    @property
    def count(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return int(self.lengths.sum())


class Batcher:
    """Merges concurrent requests for one model version into padded model calls, run in one worker thread.

    Each round takes the queued requests (waiting up to max_queue_delay_ms for more while under max_batch_size
    sequences), sorts their sequences by length so that padding stays small, cuts them into calls bounded by
    max_batch_size sequences and max_batch_tokens padded tokens, and routes the output rows back to their callers.
    """

    def __init__(
        self,
        backend: Backend,
        config: ModelConfig,
        name: str,
        pad_token_id: int = 0,
        observer: BatchObserver | None = None,
        instances: int | None = None,
        call_cost_tokens: float | None = None,
        nice: int = 0,
        pooling: str | None = None,
    ) -> None:
        self.backend = backend
        self.observer: BatchObserver = observer or _Unobserved()
        self.config = config
        self.name = name
        self.pad_token_id = pad_token_id
        self.token_level = token_level(config.task)
        # How callers that ask for it get their sequences pooled (embedding models only; see submit).
        self.pooling = check_pooling(pooling) if pooling is not None and config.task is Task.EMBEDDING else None
        self._queue: deque[_Request] = deque()
        self._wakeup = asyncio.Event()
        self._pending = 0
        # Calls cut from the rounds taken so far, waiting for a free instance; and what each instance is running
        # now (both answered with UNAVAILABLE if the batcher closes meanwhile).
        self._calls: deque[list[tuple[_Request, int]]] = deque()
        self._running: dict[int, list[tuple[_Request, int]]] = {}
        # Padding worth accepting to save a call (see _cut): given, from tandem.json, or a middle-of-the-road guess.
        if call_cost_tokens is None:
            call_cost_tokens = config.batch_call_cost_tokens
        self.call_cost_tokens = DEFAULT_CALL_COST_TOKENS if call_cost_tokens is None else call_cost_tokens
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        # One thread per instance: up to `instances` model calls run at once (each on the backend's share of the
        # cores), and the event loop never waits on one.
        self.instances = instances or config.instances or 1
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.instances, thread_name_prefix=f"infer-{name}", initializer=lower_priority, initargs=(nice,)
        )

    @property
    def pending(self) -> int:
        """Sequences admitted and not yet answered (waiting or running)."""
        return self._pending

    async def submit(
        self,
        input_ids: IntArray,
        token_type_ids: IntArray | None,
        cu_seqlens: npt.NDArray[np.int32],
        deadline: float | None,
        pool: bool = False,
    ) -> FloatArray:
        """The output rows of one ragged batch: [total_tokens, width] or [n, width], in the caller's order.

        With pool (and a pooling, i.e. an embedding model), each sequence's token rows are pooled in the worker
        thread right after its model call, and the caller gets [n, width]: see pools()."""
        if self._closed:
            raise errors.unavailable(f"model {self.name} is shutting down", model=self.name)
        count = len(cu_seqlens) - 1
        if self._pending + count > self.config.max_queue_size:
            raise errors.resource_exhausted(
                f"model {self.name} is busy: {self._pending} sequences queued, limit {self.config.max_queue_size}",
                model=self.name,
            )
        if deadline is not None and deadline <= time.monotonic():
            raise errors.deadline_exceeded(f"deadline passed before {self.name} could run", model=self.name)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[FloatArray] = loop.create_future()
        cu = cu_seqlens.astype(np.int64)
        request = _Request(
            input_ids,
            token_type_ids,
            cu[:-1],
            np.diff(cu),
            deadline,
            future,
            count,
            queued_at=time.perf_counter(),
            pool=self.pools(pool),
        )
        self._pending += count
        future.add_done_callback(lambda _: self._release(count))
        if tracing.enabled():  # nothing per request on the hot path while tracing is off
            request.caller = trace.get_current_span()
            request.queued = tracing.tracer().start_span("queue", attributes={"tandem.model": self.name})
            future.add_done_callback(lambda _: tracing.end(request.queued))
        self._queue.append(request)
        self._wakeup.set()
        if not self._workers:
            self._workers = [
                loop.create_task(self._work(i), name=f"batcher-{self.name}-{i}") for i in range(self.instances)
            ]
        # A cancelled caller cancels this future too, and the worker then skips its sequences.
        output = await future
        # The split the caller gets in its x-tandem-timing trailer: waiting for the batcher vs. in the model.
        timing.add("queue", (request.started_at or request.queued_at) - request.queued_at)
        timing.add("compute", request.compute_s)
        return output

    def pools(self, asked: bool) -> bool:
        """Whether a caller asking for pooled rows gets them: only from embedding models, which name a pooling."""
        return asked and self.pooling is not None

    def _release(self, count: int) -> None:
        self._pending -= count

    async def _work(self, worker: int) -> None:
        """One instance: runs the next cut call whenever it is free; when none is left, cuts the next round.

        A round's calls go to a shared list, so while one instance runs a call the others take the next ones. A call
        that has the model to itself (nothing else cut, queued or running) runs on all of the stage's threads when
        the backend can (Backend.runs_alone): a lone request is not held to one instance's share of the cores. A
        call that starts meanwhile does not wait for it; the two share the cores until the lone one ends.
        """
        while True:
            if not self._calls:
                while not self._queue and not self._calls:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                if self._calls:  # another instance cut a round while this one waited
                    continue
                taken = await self._take()
                try:
                    self._plan(taken)
                except Exception:
                    log.exception("batcher of %s failed to plan a round", self.name)
                    self._fail(taken, errors.internal())
                if self._calls or self._queue:  # more work than this instance can start now: wake the others
                    self._wakeup.set()
                continue
            call = self._calls.popleft()
            alone = self.backend.runs_alone and not self._calls and not self._queue and not self._running
            self._running[worker] = call
            try:
                await self._run_call(call, alone)
            except Exception:
                log.exception("model call of %s failed", self.name)
                self._fail([r for r, _ in call], errors.internal())
            finally:
                self._running.pop(worker, None)

    @staticmethod
    def _fail(requests: Iterable[_Request], error: Exception) -> None:
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)

    async def _take(self) -> list[_Request]:
        """Whole requests from the queue, lingering for more while under max_batch_size sequences."""
        taken: list[_Request] = []
        count = 0
        limit = self.config.max_batch_size
        linger_until = time.monotonic() + self.config.max_queue_delay_ms / 1000
        while True:
            while self._queue and (count < limit or not taken):
                request = self._queue.popleft()
                if request.future.done():  # cancelled while queued
                    continue
                taken.append(request)
                count += request.count
            left = linger_until - time.monotonic()
            if count >= limit or left <= 0:
                return taken
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._wakeup.wait()

    def _wanted(self, request: _Request, now: float) -> bool:
        """False for requests already answered or cancelled, and for those past their deadline (failed here)."""
        if request.future.done():
            return False
        if request.deadline is not None and request.deadline <= now:
            request.future.set_exception(
                errors.deadline_exceeded(f"deadline passed while queued for {self.name}", model=self.name)
            )
            return False
        return True

    def _cut(self, lengths: npt.NDArray[np.int64]) -> list[npt.NDArray[np.intp]]:
        """Sequence indices grouped into calls, shortest first.

        A call ends where the next sequence would break a batch limit, or where padding the rows already in it up
        to the next sequence's length would cost more than a call of its own (call_cost_tokens: the model's fixed
        cost per call, in padded tokens; measured when the version loads).
        """
        order = np.argsort(lengths, kind="stable")
        ordered = lengths[order].tolist()
        calls: list[npt.NDArray[np.intp]] = []
        start = 0
        for end in range(1, len(order)):
            rows = end - start  # rows in the call so far; ordered[end - 1] is its longest
            longer = ordered[end]
            if (
                rows + 1 > self.config.max_batch_size
                or (rows + 1) * longer > self.config.max_batch_tokens
                or rows * (longer - ordered[end - 1]) > self.call_cost_tokens
            ):
                calls.append(order[start:end])
                start = end
        calls.append(order[start:])
        return calls

    def _plan(self, taken: list[_Request]) -> None:
        """Cuts a round's live sequences into calls, queued for whichever instance is free first."""
        for request in taken:
            tracing.end(request.queued)
        live = [r for r in taken if self._wanted(r, time.monotonic())]
        if not live:
            return
        items = [(r, i) for r in live for i in range(r.count)]
        lengths = np.concatenate([r.lengths for r in live])
        self._calls.extend([items[j] for j in call] for call in self._cut(lengths))

    async def _run_call(self, call: list[tuple[_Request, int]], alone: bool = False) -> None:
        now = time.monotonic()
        chosen = [item for item in call if self._wanted(item[0], now)]
        if not chosen:
            return
        riders = list(dict.fromkeys(r for r, _ in chosen))
        started = time.perf_counter()
        for request in riders:
            if request.started_at is None:
                request.started_at = started
                self.observer.queued(started - request.queued_at)
        with self._model_run_span(chosen, riders, alone):
            out, pooled = await asyncio.get_running_loop().run_in_executor(self._executor, self._execute, chosen, alone)
        seconds = time.perf_counter() - started
        for request in riders:
            request.compute_s += seconds
        width = max(int(r.lengths[i]) for r, i in chosen)
        self.observer.batch(len(chosen), len(chosen) * width, seconds)
        self._scatter(chosen, out, pooled)
        for request, _ in chosen:
            request.remaining -= 1
            if request.remaining == 0 and not request.future.done():
                assert request.output is not None
                request.future.set_result(request.output)

    def _scatter(self, chosen: list[tuple[_Request, int]], out: FloatArray, pooled: FloatArray | None) -> None:
        """Each output row into its caller's output, on the event loop: the calls of one request may finish on
        several instances at once, and only one thread may ever create and fill a request's output."""
        for row, (r, i) in enumerate(chosen):
            if r.output is None:
                rows = r.total if self.token_level and not r.pool else r.count
                r.output = np.empty((rows, out.shape[-1]), dtype=np.float32)
            if r.pool:
                assert pooled is not None
                r.output[i] = pooled[row]
            elif self.token_level:
                start, length = int(r.starts[i]), int(r.lengths[i])
                r.output[start : start + length] = out[row, :length]
            else:
                r.output[i] = out[row]

    def _model_run_span(
        self, chosen: list[tuple[_Request, int]], callers: list[_Request], alone: bool
    ) -> contextlib.AbstractContextManager[trace.Span]:
        """One span per model call, under its first caller's span and linked to every other caller's."""
        if not tracing.enabled():
            return contextlib.nullcontext(trace.INVALID_SPAN)
        model, _, version = self.name.rpartition(":")
        lengths = [int(r.lengths[i]) for r, i in chosen]
        return tracing.tracer().start_as_current_span(
            "model.run",
            context=trace.set_span_in_context(callers[0].caller),
            links=[trace.Link(r.caller.get_span_context()) for r in callers[1:]],
            attributes={
                "tandem.model": model or self.name,
                "tandem.model_version": version,
                "tandem.batch_size": len(chosen),
                "tandem.requests": len(callers),
                "tandem.tokens": sum(lengths),
                "tandem.padded_tokens": len(chosen) * max(lengths),
                "tandem.alone": alone,
            },
        )

    def _execute(self, chosen: list[tuple[_Request, int]], alone: bool = False) -> tuple[FloatArray, FloatArray | None]:
        """Worker thread: pad, run the model, check the output's shape, pool the rows if any caller asked for it.
        Touches no request's state."""
        width = max(int(r.lengths[i]) for r, i in chosen)
        ids = np.full((len(chosen), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids) if self.backend.uses_token_type_ids else None
        for row, (r, i) in enumerate(chosen):
            start, length = int(r.starts[i]), int(r.lengths[i])
            ids[row, :length] = r.input_ids[start : start + length]
            mask[row, :length] = 1
            if types is not None and r.token_type_ids is not None:
                types[row, :length] = r.token_type_ids[start : start + length]
        out = (self.backend.run_alone if alone else self.backend.run)(ids, mask, types)
        expected = (len(chosen), width) if self.token_level else (len(chosen),)
        if out.shape[: len(expected)] != expected or out.ndim != len(expected) + 1:
            raise ValueError(f"{self.name} returned shape {list(out.shape)} for a {list(ids.shape)} batch")
        if self.pooling is None or not any(r.pool for r, _ in chosen):
            return out, None
        return out, pool_padded(out, mask, self.pooling)

    async def close(self) -> None:
        """Fails what is still queued or running, stops the worker and its thread."""
        self._closed = True
        calls = [*self._running.values(), *self._calls]
        unanswered = [*(r for call in calls for r, _ in call), *self._queue]
        self._queue.clear()
        self._calls.clear()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for request in unanswered:
            if not request.future.done():
                request.future.set_exception(errors.unavailable(f"model {self.name} is shutting down", model=self.name))
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self.backend.close()


# ----------------------------------------------------------------------------------------------------------------------
# The stage


class ModelState(StrEnum):
    """Where a version is in its lifecycle; the value reads well in messages ("model m:2 is loading")."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"


@dataclass(eq=False)
class LoadedModel:
    """One model version in memory and how far it got: loading, ready with its backend and batcher, failed and why,
    or on its way out (unloading: answers the requests already pinned to it, then frees its backend)."""

    model: ModelVersion
    state: ModelState = ModelState.LOADING
    reason: str = ""
    backend: Backend | None = None
    batcher: Batcher | None = None
    task: asyncio.Task[None] | None = None
    # tokenizer_fingerprint() of the version folder as loaded: ids from any other tokenizer are refused.
    fingerprint: str = ""
    in_flight: int = 0
    # When the latest request arrived (monotonic): an unloading version waits until it has been idle a while.
    last_used: float = 0.0
    retired_at: float = 0.0
    # Past the unload timeout: new requests are refused while the running ones finish.
    refusing: bool = False
    drain: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        return self.state in (ModelState.READY, ModelState.UNLOADING) and not self.refusing and self.batcher is not None


@dataclass
class ModelEntry:
    """What the stage knows of one model folder, and where its requests go.

    `default` and `aliases` only ever name READY versions: a version that an alias or the policy moves to takes
    requests once it is warm, in one step on the event loop, and the one it replaces unloads after it falls idle.
    """

    name: str
    listing: Listing | None = None
    # Why the model as a whole cannot be served (tandem.json unreadable); what is loaded keeps serving.
    error: str = ""
    models: dict[str, ModelVersion] = field(default_factory=dict)
    # Versions whose folder cannot be read (no config.json, invalid metadata.json), and why.
    broken: dict[str, str] = field(default_factory=dict)
    default: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    # Versions loaded by LoadModel beyond the policy, and versions unloaded by UnloadModel (both until undone).
    requested: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)
    held_all: bool = False
    # Versions being loaded for a SetAlias that has not written the alias yet.
    pending: Counter[str] = field(default_factory=Counter)
    scanned_at: float = 0.0


@dataclass(frozen=True)
class _Scan:
    """One model folder read in a worker thread, applied on the event loop."""

    name: str
    started: float
    listing: Listing | None
    error: str
    models: dict[str, ModelVersion]
    broken: dict[str, str]


@dataclass(frozen=True)
class ModelDescription:
    """What ListModels and GetModel tell about a model and the version that serves it."""

    name: str
    task: Task | None
    versions: tuple[str, ...]
    version: str
    max_input_length: int
    embedding_dimension: int
    labels: tuple[str, ...]
    ready: bool
    backend: str
    multi_label: bool
    # Why the model is not ready (loading, or the failure); empty when it is.
    reason: str = ""


@dataclass(frozen=True)
class VersionStatus:
    """One version as the management API shows it."""

    version: str
    state: ModelState
    reason: str
    aliases: tuple[str, ...]
    is_default: bool
    precision: str
    backend: str
    fingerprint: str
    source: str
    created: datetime | None
    accuracy: AccuracyReport | None
    in_flight: int


@dataclass(frozen=True)
class ModelStatus:
    """One model as the management API shows it."""

    name: str
    task: Task | None
    policy: VersionPolicy | None
    versions: tuple[VersionStatus, ...]
    aliases: dict[str, str]
    default_version: str
    reason: str


@dataclass(frozen=True)
class TokenInputs:
    """A ragged batch as the stage receives it: sequence i is input_ids[cu_seqlens[i]:cu_seqlens[i+1]]."""

    input_ids: IntArray
    token_type_ids: IntArray | None
    cu_seqlens: npt.NDArray[np.int32]


def _warm_up(backend: Backend, model: ModelVersion) -> None:
    """One small call, so the first request pays no lazy initialisation; also checks the output's shape."""
    ids = np.ones((1, 2), dtype=np.int64)
    out = backend.run(ids, np.ones_like(ids), np.zeros_like(ids))
    if backend.runs_alone:
        backend.run_alone(ids, np.ones_like(ids), np.zeros_like(ids))
    rank = 3 if token_level(model.task) else 2
    if out.ndim != rank:
        raise ValueError(f"a {model.task} model must return {rank} dimensions, got shape {list(out.shape)}")
    if model.labels and model.task is not Task.EMBEDDING and out.shape[-1] != len(model.labels):
        raise ValueError(f"the model returns {out.shape[-1]} scores but names {len(model.labels)} labels")


def measure_call_cost(
    backend: Backend, model: ModelVersion, rows: int = 8, length: int = 16, repeats: int = 15
) -> float:
    """The model's fixed cost per call in padded tokens: what one more call costs beyond the tokens it carries.

    Fitted from the median times of 1 x `length` and `rows` x `length` calls, run alternately so that a change in the
    machine's speed while it measures (other stages start at the same time) hits both sizes alike: measured one
    size after the other, five times each, twelve restarts of `tandem serve` gave 5.7 to 14.3 tokens; in turn,
    fifteen times each, eight gave 7.9 to 10.4. The
    batcher cuts a round where padding would cost more than this: on CPU a call costs a few tokens
    (all-MiniLM-L6-v2, one thread: about 7), so sequences of different lengths run apart; on a GPU a call costs
    thousands and rounds stay whole.
    """
    length = min(length, model.max_length)
    shapes = {}
    for batch in (1, rows):
        ids = np.ones((batch, length), dtype=np.int64)  # id 1 exists in every vocabulary the warm-up accepts
        shapes[batch] = (ids, np.ones_like(ids), np.zeros_like(ids))
        backend.run(*shapes[batch])
    times: dict[int, list[float]] = {1: [], rows: []}
    for _ in range(repeats):
        for batch, inputs in shapes.items():
            started = time.perf_counter()
            backend.run(*inputs)
            times[batch].append(time.perf_counter() - started)
    one, many = float(np.median(times[1])), float(np.median(times[rows]))
    per_token = (many - one) / ((rows - 1) * length)
    if per_token <= 0:  # as fast for many rows as for one: no padding is worth a call
        return float(model.config.max_batch_tokens)
    fixed = max(one - per_token * length, 0.0)
    return min(fixed / per_token, float(model.config.max_batch_tokens))


def _checked_fingerprint(model: ModelVersion) -> str:
    """The version folder's tokenizer fingerprint, which must equal the one its metadata.json recorded."""
    fingerprint = tokenizer_fingerprint(model.path)
    recorded = model.metadata.tokenizer_fingerprint if model.metadata is not None else ""
    if recorded and fingerprint != recorded:
        raise ValueError(
            f"the tokenizer files ({fingerprint}) differ from the tokenizer {METADATA_FILE} recorded ({recorded})"
        )
    return fingerprint


class Inference:
    """Serves every model of the repository: loads the versions each model's policy and aliases want, routes
    requests to ready versions, validates them, and hands them to their batcher. Also the model lifecycle behind
    the management API: load, unload, aliases, reload."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        home: Path,
        intra_op_threads: int | None = None,
        device: str | None = None,
        spinning: bool = True,
        instances: int | None = None,
        run_alone: bool | None = None,
        compute_nice: int = 0,
        backend_factory: BackendFactory = create_backend,
        watch_s: float | None = 1.0,
        unload_idle_s: float = 3.0,
        unload_timeout_s: float = 60.0,
        observers: Callable[[str], BatchObserver] | None = None,
    ) -> None:
        self.repository = repository
        # One observer per model name (a metrics label), shared by its versions' batchers.
        self.observers = observers
        threads = intra_op_threads or usable_cpus()
        self.options = BackendOptions(
            home=home,
            intra_op_threads=threads,
            device=device,
            spinning=spinning,
            instances=instances,
            run_alone=run_alone,
        )
        self.backend_factory = backend_factory
        self.compute_nice = compute_nice
        self.watch_s = watch_s
        # A version leaving service keeps answering until no request has reached it for this long: the gateway
        # pins versions for up to a second (its model cache) before its calls arrive here.
        self.unload_idle_s = unload_idle_s
        self.unload_timeout_s = unload_timeout_s
        self._slots: dict[tuple[str, str], LoadedModel] = {}
        self._models: dict[str, ModelEntry] = {}
        self._refresh_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        # Exports and loads are CPU-heavy: one at a time, away from the event loop and the model workers.
        # The loader's niceness passes to the thread pools ONNX Runtime starts in it (threads inherit it).
        self._loader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tandem-load", initializer=lower_priority, initargs=(compute_nice,)
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Reading the repository

    async def start(self) -> None:
        """Loads and warms up what every model's policy wants (by default its newest version); a version that fails
        is marked failed, and with a `latest` policy the next older one loads instead. Then watches the folder."""
        await self.refresh()
        while loading := [s.task for s in self._slots.values() if s.state is ModelState.LOADING and s.task]:
            await asyncio.gather(*loading)
        if self.watch_s and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self.watch_s), name="model-watch")

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                # A version folder copied in place (not renamed in) may still be filling up: new ones are taken
                # only once they have not changed for a second.
                await self.refresh(settle_s=1.0)
            except Exception:
                log.exception("reading the model repository failed")

    async def refresh(self, names: Sequence[str] | None = None, settle_s: float = 0.0) -> list[ModelEntry]:
        """Reads model folders (all, and any new ones, when `names` is None) and loads or unloads what changed."""
        async with self._refresh_lock:
            if names is None:
                found = await asyncio.to_thread(self.repository.names)
                names = sorted(set(found) | set(self._models))
            known = {name: self._known_versions(name) for name in names}
            scans = await asyncio.to_thread(lambda: [self._scan(n, known[n], settle_s) for n in names])
            return [self._apply(scan) for scan in scans]

    def _known_versions(self, name: str) -> set[str]:
        entry = self._models.get(name)
        return set(entry.models) | set(entry.broken) if entry is not None else set()

    def _scan(self, name: str, known: set[str] | None = None, settle_s: float = 0.0) -> _Scan:
        """Worker thread: the folder's listing and every version's metadata."""
        started = time.monotonic()
        try:
            listing = self.repository.listing(name)
        except errors.TandemError:
            return _Scan(name, started, None, "", {}, {})
        if settle_s > 0:
            now = time.time()
            fresh = [
                v
                for v in listing.versions
                if v not in (known or ()) and now - (self.repository.root / name / v).stat().st_mtime < settle_s
            ]
            if fresh:
                listing = dataclasses.replace(listing, versions=tuple(v for v in listing.versions if v not in fresh))
        if listing.config_error:
            return _Scan(name, started, listing, listing.config_error, {}, {})
        models: dict[str, ModelVersion] = {}
        broken: dict[str, str] = {}
        for version in listing.versions:
            try:
                models[version] = self.repository.load(name, version)
            except errors.TandemError as exc:
                broken[version] = str(exc)
        return _Scan(name, started, listing, "", models, broken)

    def _apply(self, scan: _Scan) -> ModelEntry:
        entry = self._models.setdefault(scan.name, ModelEntry(scan.name))
        if scan.started < entry.scanned_at:  # an older read finishing late
            return entry
        entry.scanned_at = scan.started
        for version, reason in scan.broken.items():
            if entry.broken.get(version) != reason:
                log.error("model %s:%s cannot be served: %s", scan.name, version, reason)
        if scan.error and scan.error != entry.error:
            log.error("model %s cannot be served: %s", scan.name, scan.error)
        entry.listing, entry.error, entry.models, entry.broken = scan.listing, scan.error, scan.models, scan.broken
        self._route(entry)
        self._converge(entry)
        return entry

    def _entry(self, name: str) -> ModelEntry:
        """The entry of a model the stage may not have read yet (read now: NOT_FOUND for unknown models)."""
        entry = self._models.get(name)
        if entry is None or entry.listing is None:
            entry = self._apply(self._scan(name))
            if entry.listing is None:
                raise errors.not_found(f"model {name!r} not found", model=name)
        return entry

    def _knows(self, entry: ModelEntry, version: str) -> bool:
        return version in entry.models or version in entry.broken

    # ------------------------------------------------------------------------------------------------------------------
    # Which versions load, and where requests go

    def _ready(self, entry: ModelEntry, version: str | None) -> bool:
        if version is None or version not in entry.models:
            return False
        slot = self._slots.get((entry.name, version))
        return slot is not None and slot.state is ModelState.READY

    def _failed(self, entry: ModelEntry) -> set[str]:
        return {
            version
            for version in entry.models
            if (slot := self._slots.get((entry.name, version))) is not None and slot.state is ModelState.FAILED
        }

    def _wanted(self, entry: ModelEntry) -> set[str]:
        """Versions that should be loaded: the policy's, the aliased, and the requested; minus the unloaded."""
        if entry.listing is None or entry.error:
            return set()
        readable = set(entry.models)
        if entry.held_all:
            return (entry.requested | set(entry.pending)) & readable
        versions = [v for v in entry.listing.versions if v in readable]
        wanted = set(entry.listing.policy.select(versions, self._failed(entry)))
        wanted |= set(entry.listing.aliases.values()) | entry.requested
        return (wanted - entry.held | set(entry.pending)) & readable

    def _route(self, entry: ModelEntry) -> None:
        """Points aliases and the bare name at READY versions; one that waits for its version keeps the old one."""
        listing = entry.listing
        if listing is None:
            entry.default, entry.aliases = None, {}
            return
        aliases: dict[str, str] = {}
        for alias, version in listing.aliases.items():
            if self._ready(entry, version):
                aliases[alias] = version
            elif self._ready(entry, entry.aliases.get(alias)):
                aliases[alias] = entry.aliases[alias]
        entry.aliases = aliases
        if DEFAULT_ALIAS in listing.aliases:
            target = aliases.get(DEFAULT_ALIAS)
        else:
            versions = [v for v in listing.versions if v in entry.models]
            chosen = listing.policy.select(versions, self._failed(entry))
            target = chosen[-1] if chosen else None
        if self._ready(entry, target):
            entry.default = target
        elif not self._ready(entry, entry.default):
            ready = [v for v in listing.versions if self._ready(entry, v)]
            preferred = [v for v in ready if v in self._wanted(entry)]
            candidates = preferred or ready
            entry.default = candidates[-1] if candidates else None

    def _converge(self, entry: ModelEntry) -> None:
        """Starts loading wanted versions; retires loaded ones that nothing wants or routes to any more."""
        if entry.error:
            return
        wanted = self._wanted(entry)
        for version in sorted(wanted, key=int):
            slot = self._slots.get((entry.name, version))
            if slot is None or slot.state is ModelState.UNLOADED:
                self._begin_load(entry.models[version])
            elif slot.state is ModelState.UNLOADING and not slot.refusing:
                self._revive(slot)
        routed = {entry.default, *entry.aliases.values()}
        for (name, version), slot in list(self._slots.items()):
            if name == entry.name and slot.state is ModelState.READY and version not in wanted | routed:
                self._retire(slot, self._why_unloaded(entry, version))

    def _why_unloaded(self, entry: ModelEntry, version: str) -> str:
        if entry.held_all or version in entry.held:
            return "unloaded on request (LoadModel loads it again)"
        if version not in entry.models:
            return "its folder is gone from the repository"
        policy = entry.listing.policy.describe() if entry.listing is not None else "the version policy"
        return f"outside the version policy ({policy}) and named by no alias"

    def _begin_load(self, model: ModelVersion) -> LoadedModel:
        slot = LoadedModel(model)
        self._slots[(model.name, model.version)] = slot
        slot.task = asyncio.get_running_loop().create_task(self._load(slot), name=f"load-{model.ref}")
        return slot

    async def _load(self, slot: LoadedModel) -> None:
        model = slot.model
        try:
            backend, fingerprint, call_cost = await asyncio.get_running_loop().run_in_executor(
                self._loader, self._load_sync, model
            )
        except Exception as exc:
            log.exception("model %s failed to load", model.ref)
            slot.state, slot.reason = ModelState.FAILED, f"{type(exc).__name__}: {exc}"
        else:
            pad = model.hf_config.get("pad_token_id")
            # Padded positions are masked out; the id only has to be a valid embedding row.
            pad_id = pad if isinstance(pad, int) and 0 <= pad < self._vocab_size(model, pad + 1) else 0
            slot.backend, slot.fingerprint = backend, fingerprint
            observer = self.observers(model.name) if self.observers is not None else None
            slot.batcher = Batcher(
                backend,
                model.config,
                model.ref,
                pad_id,
                observer,
                instances=self.options.instances_of(model),
                call_cost_tokens=call_cost,
                nice=self.compute_nice,
                pooling=model.pooling,
            )
            slot.state = ModelState.READY
        entry = self._models.get(model.name)
        if entry is not None:
            self._route(entry)
            self._converge(entry)

    def _load_sync(self, model: ModelVersion) -> tuple[Backend, str, float]:
        started = time.perf_counter()
        fingerprint = _checked_fingerprint(model)
        backend = self.backend_factory(model, self.options)
        try:
            _warm_up(backend, model)
            call_cost = model.config.batch_call_cost_tokens
            if call_cost is None:
                call_cost = measure_call_cost(backend, model)
        except Exception:
            backend.close()
            raise
        log.info(
            "model %s ready on %s%s in %.1fs (%d instance(s) of %d thread(s)%s, a call costs %.1f padded tokens)",
            model.ref,
            backend.name,
            " with I/O binding" if backend.io_binding else "",
            time.perf_counter() - started,
            self.options.instances_of(model),
            self.options.threads_of(model),
            f", {self.options.alone_threads_of(model)} for a lone call" if backend.runs_alone else "",
            call_cost,
        )
        return backend, fingerprint, call_cost

    def _retire(self, slot: LoadedModel, reason: str) -> None:
        """No longer routed to; unloads once idle for unload_idle_s (at most unload_timeout_s from now)."""
        if slot.state is not ModelState.READY:
            return
        slot.state, slot.reason = ModelState.UNLOADING, reason
        slot.retired_at = time.monotonic()
        slot.drain = asyncio.get_running_loop().create_task(self._drain(slot), name=f"unload-{slot.model.ref}")
        log.info("model %s unloading: %s", slot.model.ref, reason)

    def _revive(self, slot: LoadedModel) -> None:
        if slot.drain is not None:
            slot.drain.cancel()
        slot.state, slot.reason, slot.drain = ModelState.READY, "", None
        log.info("model %s stays loaded", slot.model.ref)

    async def _drain(self, slot: LoadedModel) -> None:
        while True:
            now = time.monotonic()
            if not slot.refusing and now - slot.retired_at >= self.unload_timeout_s:
                slot.refusing = True
                log.warning(
                    "model %s still busy after %.0fs: refusing new requests", slot.model.ref, now - slot.retired_at
                )
            idle_for = now - max(slot.last_used, slot.retired_at)
            if slot.in_flight == 0 and (slot.refusing or idle_for >= self.unload_idle_s):
                break
            wait = 0.02 if slot.in_flight or slot.refusing else self.unload_idle_s - idle_for
            await asyncio.sleep(max(0.005, min(wait, slot.retired_at + self.unload_timeout_s - now)))
        # From here no await until the state says UNLOADED, so no request can slip in.
        slot.state, slot.drain = ModelState.UNLOADED, None
        batcher, backend = slot.batcher, slot.backend
        slot.batcher = slot.backend = None
        if batcher is not None:
            await batcher.close()
        elif backend is not None:
            backend.close()
        log.info("model %s unloaded", slot.model.ref)
        entry = self._models.get(slot.model.name)
        if entry is not None:
            self._converge(entry)

    @staticmethod
    def _vocab_size(model: ModelVersion, default: int) -> int:
        value = model.hf_config.get("vocab_size")
        return value if isinstance(value, int) and value > 0 else default

    # ------------------------------------------------------------------------------------------------------------------
    # Requests

    def _select(self, model_ref: str) -> tuple[ModelVersion, LoadedModel | None]:
        """The version a reference names and its slot (None when that version is not loaded and should not be).

        A bare name gets the model's default version, an alias the version it points to now, both only ever READY
        ones once one is; a version the stage has not seen yet is read first and, if wanted, starts loading."""
        parsed = parse_reference(model_ref)
        name = parsed.name or self.repository.default_model
        if not name:
            raise errors.invalid_argument("no model named and this server has no default model", "model")
        entry = self._entry(name)
        if parsed.version is not None:
            _, version = self.repository.target(model_ref)
        else:
            routed = entry.default if parsed.alias is None else entry.aliases.get(parsed.alias)
            if routed is not None and self._ready(entry, routed):
                version = routed
            else:
                _, version = self.repository.target(f"{name}@{parsed.alias}" if parsed.alias else name)
        if not self._knows(entry, version):
            entry = self._apply(self._scan(name))
        model = self.repository.load(name, version)
        slot = self._slots.get((name, version))
        if slot is None or slot.state is ModelState.UNLOADED:
            if version not in self._wanted(entry):
                return model, None
            slot = self._begin_load(model)
        return model, slot

    def loaded(self, model_ref: str) -> LoadedModel:
        """The slot that serves a reference (tests and diagnostics)."""
        model, slot = self._select(model_ref)
        if slot is None:
            raise self._not_loaded(model)
        return slot

    def _not_loaded(self, model: ModelVersion) -> errors.TandemError:
        entry = self._models.get(model.name)
        why = self._why_unloaded(entry, model.version) if entry is not None else "not loaded"
        return errors.failed_precondition(
            f"model {model.ref} is not loaded: {why}",
            reason=MODEL_NOT_LOADED,
            model=model.name,
            version=model.version,
        )

    def gauges(self) -> list[tuple[str, str, str, int]]:
        """(model, version, state, sequences pending) of every version in the table, for the metrics scrape."""
        return [
            (s.model.name, s.model.version, s.state.value, s.batcher.pending if s.batcher is not None else 0)
            for s in list(self._slots.values())
        ]

    async def infer(
        self,
        model_ref: str,
        input_ids: IntArray,
        token_type_ids: IntArray | None,
        cu_seqlens: npt.NDArray[np.int32],
        deadline: float | None,
        tokenizer_fingerprint: str = "",
        pool: bool = False,
    ) -> tuple[ModelVersion, FloatArray, bool]:
        """Runs a ragged batch through the model's batcher: [total_tokens, width] or [n, width] float32, and
        whether the rows are pooled ones (pool asked of an embedding model: [n, width])."""
        model, slot = self._select(model_ref)
        if slot is None:
            raise self._not_loaded(model)
        if tokenizer_fingerprint and slot.fingerprint and tokenizer_fingerprint != slot.fingerprint:
            raise errors.failed_precondition(
                f"the token ids were made by another tokenizer ({tokenizer_fingerprint}) than {model.ref}'s"
                f" ({slot.fingerprint}); the tokenizer and inference stages read different files for this version",
                reason=TOKENIZER_MISMATCH,
                model=model.name,
                version=model.version,
                expected=slot.fingerprint,
                got=tokenizer_fingerprint,
            )
        self._validate(model, input_ids, token_type_ids, cu_seqlens)
        if not slot.serving or slot.batcher is None:
            detail = f": {slot.reason}" if slot.reason else ""
            state = "unloading" if slot.refusing else slot.state
            raise errors.unavailable(f"model {model.ref} is {state}{detail}", model=model.name, version=model.version)
        if not slot.batcher.backend.uses_token_type_ids:
            token_type_ids = None
        slot.in_flight += 1
        slot.last_used = time.monotonic()
        try:
            pooled = slot.batcher.pools(pool)
            output = await slot.batcher.submit(input_ids, token_type_ids, cu_seqlens, deadline, pool=pooled)
        finally:
            slot.in_flight -= 1
        return model, output, pooled

    def _validate(
        self,
        model: ModelVersion,
        input_ids: IntArray,
        token_type_ids: IntArray | None,
        cu_seqlens: npt.NDArray[np.int32],
    ) -> None:
        if input_ids.ndim != 1:
            raise errors.invalid_argument("input_ids must be flat: [total_tokens]", "batch.input_ids")
        if len(cu_seqlens) < 2 and len(input_ids) == 0:
            raise errors.invalid_argument("the batch holds no sequences", "batch")
        ragged = tensors.check_cu_seqlens(cu_seqlens, len(input_ids), "batch.cu_seqlens")
        if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
            raise errors.invalid_argument(
                f"{len(token_type_ids)} token_type_ids for {len(input_ids)} input_ids; give one per token or none",
                "batch.token_type_ids",
            )
        if ragged.count > model.config.max_queue_size:
            raise errors.invalid_argument(
                f"{ragged.count} sequences exceed the limit of {model.config.max_queue_size} per request",
                "batch.cu_seqlens",
                reason=errors.TOO_MANY_INPUTS,
            )
        lengths = ragged.lengths()
        empty = np.flatnonzero(lengths == 0)
        if len(empty):
            i = int(empty[0])
            raise errors.invalid_argument(f"sequence {i} is empty", "batch.cu_seqlens", sequence=str(i))
        too_long = np.flatnonzero(lengths > model.max_length)
        if len(too_long):
            i = int(too_long[0])
            raise errors.invalid_argument(
                f"sequence {i} has {int(lengths[i])} tokens, more than the limit of {model.max_length} of {model.name}",
                "batch.cu_seqlens",
                reason=errors.INPUT_TOO_LONG,
                sequence=str(i),
            )
        vocab = self._vocab_size(model, 0)
        if vocab and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            bad = int(input_ids[(input_ids < 0) | (input_ids >= vocab)][0])
            raise errors.invalid_argument(
                f"token id {bad} is outside the vocabulary of {model.name} (0..{vocab - 1})", "batch.input_ids"
            )
        segments = model.hf_config.get("type_vocab_size")
        if (
            token_type_ids is not None
            and isinstance(segments, int)
            and segments > 0
            and len(token_type_ids)
            and (int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= segments)
        ):
            raise errors.invalid_argument(
                f"token_type_ids must lie in 0..{segments - 1} for {model.name}", "batch.token_type_ids"
            )

    def models(self) -> list[ModelDescription]:
        """Every model of the repository, sorted by name, described by the version that serves it."""
        out: list[ModelDescription] = []
        for name in self.repository.names():
            try:
                versions = tuple(self.repository.versions(name))
                model, slot = self._select(name)
            except errors.TandemError as exc:
                out.append(self._describe_broken(name, str(exc)))
                continue
            out.append(self._describe(model, slot, versions))
        return out

    def model(self, model_ref: str) -> ModelDescription:
        """One model, described by the version the reference names (or the one serving a bare name or alias)."""
        model, slot = self._select(model_ref)
        return self._describe(model, slot, tuple(self.repository.versions(model.name)))

    def _describe(self, model: ModelVersion, slot: LoadedModel | None, versions: tuple[str, ...]) -> ModelDescription:
        ready = slot is not None and slot.state is ModelState.READY
        reason = ""
        if slot is None:
            reason = str(self._not_loaded(model))
        elif not ready:
            reason = slot.reason or str(slot.state)
        return ModelDescription(
            name=model.name,
            task=model.task,
            versions=versions,
            version=model.version,
            max_input_length=model.max_length,
            embedding_dimension=model.hidden_size if model.task is Task.EMBEDDING else 0,
            labels=model.labels if model.task is not Task.EMBEDDING else (),
            ready=ready,
            backend=slot.backend.name if slot is not None and slot.backend else _backend_label(model.config),
            multi_label=model.multi_label,
            reason=reason,
        )

    @staticmethod
    def _describe_broken(name: str, reason: str, versions: tuple[str, ...] = ()) -> ModelDescription:
        return ModelDescription(
            name=name,
            task=None,
            versions=versions,
            version=versions[-1] if versions else "",
            max_input_length=0,
            embedding_dimension=0,
            labels=(),
            ready=False,
            backend="",
            multi_label=False,
            reason=reason,
        )

    # ------------------------------------------------------------------------------------------------------------------
    # The management API

    async def statuses(self) -> list[ModelStatus]:
        """Every model of the repository as of now (reading the folder starts loads the watcher would start)."""
        entries = await self.refresh()
        return [self._status(e) for e in sorted(entries, key=lambda e: e.name) if self._listed(e)]

    def _listed(self, entry: ModelEntry) -> bool:
        return entry.listing is not None or any(name == entry.name for name, _ in self._slots)

    async def _managed(self, name: str, version: str | None = None) -> ModelEntry:
        """The entry of a model named by a management call, read now: INVALID_ARGUMENT for names or versions that
        reach outside the repository (before anything is read), NOT_FOUND for unknown ones."""
        await asyncio.to_thread(self.repository.contained_folder, name, version or None)
        (entry,) = await self.refresh([name])
        if entry.listing is None:
            raise errors.not_found(f"model {name!r} not found", model=name)
        if entry.error:
            raise errors.failed_precondition(entry.error, reason=MODEL_CONFIG_INVALID, model=name)
        if version and version in entry.broken:
            raise errors.failed_precondition(entry.broken[version], reason=MODEL_BROKEN, model=name, version=version)
        return entry

    async def load(self, name: str, version: str = "", wait: bool = False) -> ModelStatus:
        """Loads one version (kept until unloaded), or what the policy wants; requests move once it is READY."""
        entry = await self._managed(name, version)
        if version:
            entry.held.discard(version)
            entry.requested.add(version)
            targets = [version]
        else:
            entry.held_all = False
            entry.held.clear()
            targets = sorted(self._wanted(entry), key=int)
        for target in targets:
            slot = self._slots.get((name, target))
            if slot is not None and slot.state is ModelState.FAILED:
                self._begin_load(entry.models.get(target, slot.model))  # retried on request
        self._converge(entry)
        self._route(entry)
        if wait:
            await self._settle(name, targets)
            if version:
                slot = self._slots.get((name, version))
                if slot is not None and slot.state is ModelState.FAILED:
                    raise errors.failed_precondition(
                        f"model {name}:{version} failed to load: {slot.reason}",
                        reason=MODEL_BROKEN,
                        model=name,
                        version=version,
                    )
        return self._status(entry)

    async def _settle(self, name: str, versions: Sequence[str]) -> None:
        """Waits for the loads of these versions, and for any they set off (fallbacks), without cancelling them."""
        while pending := [
            slot.task
            for (n, v), slot in self._slots.items()
            if n == name and slot.state is ModelState.LOADING and slot.task and (v in versions or not versions)
        ]:
            await asyncio.wait(pending)

    async def unload(self, name: str, version: str = "", wait: bool = False) -> ModelStatus:
        """Unloads one version, or all of them; each keeps answering what is pinned to it until idle."""
        entry = await self._managed(name, version)
        if version:
            entry.requested.discard(version)
            entry.held.add(version)
            versions = [version]
        else:
            entry.held_all = True
            entry.requested.clear()
            versions = [v for n, v in self._slots if n == name]
        for v in versions:
            slot = self._slots.get((name, v))
            if slot is not None:
                self._retire(slot, self._why_unloaded(entry, v))
        self._route(entry)
        self._converge(entry)
        if wait:
            await self._settle(name, versions)  # a version still loading retires once it is loaded
            drains = [s.drain for (n, v), s in self._slots.items() if n == name and v in versions and s.drain]
            if drains:
                await asyncio.wait(drains)
        return self._status(entry)

    async def set_alias(self, name: str, alias: str, version: str) -> ModelStatus:
        """Loads and warms up the version first (the alias stays where it was if that fails), then moves it."""
        check_alias(alias)
        entry = await self._managed(name, version)
        entry.held.discard(version)
        if entry.held_all:  # every version was unloaded on request: the alias asks for this one back
            entry.requested.add(version)
        entry.pending[version] += 1
        try:
            slot = self._slots.get((name, version))
            if slot is None or slot.state in (ModelState.UNLOADED, ModelState.FAILED):
                slot = self._begin_load(entry.models[version])
            elif slot.state is ModelState.UNLOADING and not slot.refusing:
                self._revive(slot)
            while slot.state is not ModelState.READY:
                if slot.state is ModelState.LOADING and slot.task is not None:
                    await asyncio.wait({slot.task})
                elif slot.state is ModelState.UNLOADING and slot.drain is not None:
                    await asyncio.wait({slot.drain})
                    slot = self._begin_load(slot.model)
                else:
                    raise errors.failed_precondition(
                        f"model {name}:{version} failed to load, so alias {alias!r} was not changed: {slot.reason}",
                        reason=MODEL_BROKEN,
                        model=name,
                        version=version,
                    )
            await asyncio.to_thread(self.repository.set_alias, name, alias, version)
        finally:
            entry.pending[version] -= 1
            if entry.pending[version] <= 0:
                del entry.pending[version]
        (entry,) = await self.refresh([name])
        return self._status(entry)

    async def delete_alias(self, name: str, alias: str) -> ModelStatus:
        check_alias(alias)
        await self._managed(name)
        await asyncio.to_thread(self.repository.delete_alias, name, alias)
        (entry,) = await self.refresh([name])
        return self._status(entry)

    async def reload(self, name: str = "", wait: bool = False) -> list[ModelStatus]:
        """Reads model folders again (all when `name` is empty), retrying versions that failed."""
        if name:
            await asyncio.to_thread(self.repository.contained_folder, name)
        names = [name] if name else sorted(set(await asyncio.to_thread(self.repository.names)) | set(self._models))
        for n in names:
            self.repository.invalidate(n)
            for (slot_name, version), slot in list(self._slots.items()):
                if slot_name == n and slot.state is ModelState.FAILED:
                    del self._slots[(slot_name, version)]
        entries = await self.refresh(names)
        if name and entries[0].listing is None:
            raise errors.not_found(f"model {name!r} not found", model=name)
        if wait:
            for n in names:
                await self._settle(n, ())
        return [self._status(e) for e in entries if self._listed(e)]

    def _status(self, entry: ModelEntry) -> ModelStatus:
        listing = entry.listing
        versions = set(listing.versions if listing is not None else ()) | {v for n, v in self._slots if n == entry.name}
        by_version: dict[str, list[str]] = {}
        for alias, version in sorted(entry.aliases.items()):
            by_version.setdefault(version, []).append(alias)
        out: list[VersionStatus] = []
        task: Task | None = None
        for version in sorted(versions, key=int):
            slot = self._slots.get((entry.name, version))
            model = slot.model if slot is not None else entry.models.get(version)
            if model is not None:
                task = model.task
            if slot is not None and not (slot.state is ModelState.UNLOADED and version in entry.broken):
                state, reason = slot.state, slot.reason
                if state is ModelState.UNLOADED:
                    reason = self._why_unloaded(entry, version)
            elif version in entry.broken:
                state, reason = ModelState.FAILED, entry.broken[version]
            else:
                state, reason = ModelState.UNLOADED, self._why_unloaded(entry, version)
            metadata = model.metadata if model is not None else None
            backend = ""
            if slot is not None and slot.backend is not None:
                backend = slot.backend.name
            elif model is not None:
                backend = _backend_label(model.config)
            out.append(
                VersionStatus(
                    version=version,
                    state=state,
                    reason=reason,
                    aliases=tuple(by_version.get(version, ())),
                    is_default=version == entry.default,
                    precision=metadata.precision if metadata is not None else "fp32",
                    backend=backend,
                    fingerprint=(slot.fingerprint if slot is not None else "")
                    or (metadata.tokenizer_fingerprint if metadata is not None else ""),
                    source=metadata.source if metadata is not None else "",
                    created=metadata.created if metadata is not None else None,
                    accuracy=metadata.accuracy if metadata is not None else None,
                    in_flight=slot.in_flight if slot is not None else 0,
                )
            )
        return ModelStatus(
            name=entry.name,
            task=task,
            policy=listing.policy if listing is not None and not entry.error else None,
            versions=tuple(out),
            aliases=dict(listing.aliases) if listing is not None else {},
            default_version=entry.default or "",
            reason=entry.error or (listing.aliases_error if listing is not None else "its folder is gone"),
        )

    async def close(self) -> None:
        """Stops watching, fails what is still queued, frees every backend and the loader thread."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for slot in self._slots.values():
            for task in (slot.task, slot.drain):
                if task is not None and not task.done():
                    task.cancel()
        for slot in self._slots.values():
            if slot.batcher is not None:
                await slot.batcher.close()
        await asyncio.to_thread(self._loader.shutdown, wait=True, cancel_futures=True)


def _backend_label(config: ModelConfig) -> str:
    return "torch" if config.backend == "torch" else OnnxBackend.name
