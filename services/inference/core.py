"""Inference domain: ragged token batches to model outputs with ONNX Runtime or PyTorch, batched per model version."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from services.common import errors, tensors
from services.common.repository import ModelConfig, ModelRepository, ModelVersion, Task, parse_reference

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
    """A loaded model: padded int64 batches in, one float32 array out. Called from one thread at a time."""

    name: str
    uses_token_type_ids: bool

    @abstractmethod
    def run(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        """[b, s] inputs -> [b, s, h] (token-level tasks) or [b, L] (sequence-level tasks)."""

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


def _cuda_present() -> bool:
    return bool(torch.cuda.is_available())


def onnx_providers(device: str, model: ModelVersion, home: Path, graph: Path) -> list[str | tuple[str, dict[str, Any]]]:
    """ONNX Runtime providers for a device setting, best first; CPU is always the last resort."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = set(ort.get_available_providers())
    # onnxruntime-gpu lists its GPU providers even on machines without a GPU; ask the driver too.
    gpu = bool(available & {"CUDAExecutionProvider", "TensorrtExecutionProvider"}) and _cuda_present()
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

    def __init__(self, path: Path, providers: Sequence[str | tuple[str, dict[str, Any]]], threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        # One model call at a time per session (the batcher's worker): parallelism lives inside the operators.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning pool threads burn the cores that the event loop, gRPC and the other stages on this host need
        # between calls; measured on 2 busy cores, spinning doubled the latency of a MiniLM call.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
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

    def run(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed: dict[str, Any] = {}
        for name, dtype in self._dtypes.items():
            value = given[name]
            feed[name] = np.zeros_like(input_ids, dtype=dtype) if value is None else value.astype(dtype, copy=False)
        out = self.session.run([self._output], feed)[0]
        return np.asarray(out, dtype=np.float32)


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
    if model.config.backend == "torch":
        return TorchBackend(model, device, options.intra_op_threads)
    path, _ = ensure_onnx(model, options.home, options.intra_op_threads)
    providers = onnx_providers(device, model, options.home, path)
    return OnnxBackend(path, providers, options.intra_op_threads)


BackendFactory = Callable[[ModelVersion, BackendOptions], Backend]


# ----------------------------------------------------------------------------------------------------------------------
# Dynamic batching


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

    def __init__(self, backend: Backend, config: ModelConfig, name: str, pad_token_id: int = 0) -> None:
        self.backend = backend
        self.config = config
        self.name = name
        self.pad_token_id = pad_token_id
        self.token_level = token_level(config.task)
        self._queue: deque[_Request] = deque()
        self._wakeup = asyncio.Event()
        self._pending = 0
        self._round: list[_Request] = []
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        # One thread per model version: calls to one model never overlap, and the event loop never waits on one.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")

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
    ) -> FloatArray:
        """The output rows of one ragged batch: [total_tokens, width] or [n, width], in the caller's order."""
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
        request = _Request(input_ids, token_type_ids, cu[:-1], np.diff(cu), deadline, future, count)
        self._pending += count
        future.add_done_callback(lambda _: self._release(count))
        self._queue.append(request)
        self._wakeup.set()
        if self._worker is None:
            self._worker = loop.create_task(self._work(), name=f"batcher-{self.name}")
        # A cancelled caller cancels this future too, and the worker then skips its sequences.
        return await future

    def _release(self, count: int) -> None:
        self._pending -= count

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            taken = await self._take()
            self._round = taken
            try:
                await self._process(taken)
            except Exception:
                log.exception("batcher of %s failed a round", self.name)
                for request in taken:
                    if not request.future.done():
                        request.future.set_exception(errors.internal())
            finally:
                self._round = []

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
        """Sequence indices grouped into calls, shortest first, within both batch limits."""
        order = np.argsort(lengths, kind="stable")
        calls: list[npt.NDArray[np.intp]] = []
        start = 0
        for end in range(1, len(order) + 1):
            if end == len(order):
                calls.append(order[start:end])
                break
            rows = end + 1 - start
            # Ascending order: the next sequence is the longest of the call if it joins.
            padded = rows * int(lengths[order[end]])
            if rows > self.config.max_batch_size or padded > self.config.max_batch_tokens:
                calls.append(order[start:end])
                start = end
        return calls

    async def _process(self, taken: list[_Request]) -> None:
        live = [r for r in taken if self._wanted(r, time.monotonic())]
        if not live:
            return
        items = [(r, i) for r in live for i in range(r.count)]
        lengths = np.concatenate([r.lengths for r in live])
        loop = asyncio.get_running_loop()
        for call in self._cut(lengths):
            now = time.monotonic()
            chosen = [items[j] for j in call if self._wanted(items[j][0], now)]
            if not chosen:
                continue
            try:
                await loop.run_in_executor(self._executor, self._execute, chosen)
            except Exception:
                log.exception("model call of %s failed", self.name)
                for request, _ in chosen:
                    if not request.future.done():
                        request.future.set_exception(errors.internal())
                continue
            for request, _ in chosen:
                request.remaining -= 1
                if request.remaining == 0 and not request.future.done():
                    assert request.output is not None
                    request.future.set_result(request.output)

    def _execute(self, chosen: list[tuple[_Request, int]]) -> None:
        """Worker thread: pad, run the model, write each row into its caller's output."""
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
        out = self.backend.run(ids, mask, types)
        expected = (len(chosen), width) if self.token_level else (len(chosen),)
        if out.shape[: len(expected)] != expected or out.ndim != len(expected) + 1:
            raise ValueError(f"{self.name} returned shape {list(out.shape)} for a {list(ids.shape)} batch")
        for row, (r, i) in enumerate(chosen):
            if r.output is None:
                r.output = np.empty((r.total if self.token_level else r.count, out.shape[-1]), dtype=np.float32)
            if self.token_level:
                start, length = int(r.starts[i]), int(r.lengths[i])
                r.output[start : start + length] = out[row, :length]
            else:
                r.output[i] = out[row]

    async def close(self) -> None:
        """Fails what is still queued or running, stops the worker and its thread."""
        self._closed = True
        unanswered = [*self._round, *self._queue]
        self._queue.clear()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for request in unanswered:
            if not request.future.done():
                request.future.set_exception(errors.unavailable(f"model {self.name} is shutting down", model=self.name))
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self.backend.close()


# ----------------------------------------------------------------------------------------------------------------------
# The stage


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class LoadedModel:
    """One model version and how far it got: loading, ready with its backend and batcher, or failed and why."""

    model: ModelVersion
    state: ModelState = ModelState.LOADING
    reason: str = ""
    backend: Backend | None = None
    batcher: Batcher | None = None
    task: asyncio.Task[None] | None = None


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
class TokenInputs:
    """A ragged batch as the stage receives it: sequence i is input_ids[cu_seqlens[i]:cu_seqlens[i+1]]."""

    input_ids: IntArray
    token_type_ids: IntArray | None
    cu_seqlens: npt.NDArray[np.int32]


def _warm_up(backend: Backend, model: ModelVersion) -> None:
    """One small call, so the first request pays no lazy initialisation; also checks the output's shape."""
    ids = np.ones((1, 2), dtype=np.int64)
    out = backend.run(ids, np.ones_like(ids), np.zeros_like(ids))
    rank = 3 if token_level(model.task) else 2
    if out.ndim != rank:
        raise ValueError(f"a {model.task} model must return {rank} dimensions, got shape {list(out.shape)}")
    if model.labels and model.task is not Task.EMBEDDING and out.shape[-1] != len(model.labels):
        raise ValueError(f"the model returns {out.shape[-1]} scores but names {len(model.labels)} labels")


class Inference:
    """Serves every model of the repository: loads them, validates requests, and hands them to their batcher."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        home: Path,
        intra_op_threads: int | None = None,
        device: str | None = None,
        backend_factory: BackendFactory = create_backend,
    ) -> None:
        self.repository = repository
        threads = intra_op_threads or os.cpu_count() or 1
        self.options = BackendOptions(home=home, intra_op_threads=threads, device=device)
        self.backend_factory = backend_factory
        self._slots: dict[tuple[str, str], LoadedModel] = {}
        # Version answering requests that name none: the newest one that is ready, so that a version added to the
        # repository takes over only once it has loaded.
        self._served: dict[str, str] = {}
        self._broken: dict[str, str] = {}
        # Exports and loads are CPU-heavy: one at a time, away from the event loop and the model workers.
        self._loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-load")

    async def start(self) -> None:
        """Loads and warms up the newest version of every model; a model that fails is logged and marked failed."""
        for name in self.repository.names():
            try:
                model = self.repository.resolve(name)
            except errors.TandemError as exc:
                log.error("model %s cannot be served: %s", name, exc)
                self._broken[name] = str(exc)
                continue
            self._begin_load(model)
        await asyncio.gather(*(slot.task for slot in self._slots.values() if slot.task is not None))

    def _begin_load(self, model: ModelVersion) -> LoadedModel:
        slot = LoadedModel(model)
        self._slots[(model.name, model.version)] = slot
        slot.task = asyncio.get_running_loop().create_task(self._load(slot), name=f"load-{model.name}")
        return slot

    async def _load(self, slot: LoadedModel) -> None:
        model = slot.model
        try:
            backend = await asyncio.get_running_loop().run_in_executor(self._loader, self._load_sync, model)
        except Exception as exc:
            log.exception("model %s:%s failed to load", model.name, model.version)
            slot.state, slot.reason = ModelState.FAILED, f"{type(exc).__name__}: {exc}"
            return
        pad = model.hf_config.get("pad_token_id")
        # Padded positions are masked out; the id only has to be a valid embedding row.
        pad_id = pad if isinstance(pad, int) and 0 <= pad < self._vocab_size(model, pad + 1) else 0
        slot.backend = backend
        slot.batcher = Batcher(backend, model.config, f"{model.name}:{model.version}", pad_id)
        slot.state = ModelState.READY
        served = self._served.get(model.name)
        if served is None or int(model.version) > int(served):
            self._served[model.name] = model.version

    def _load_sync(self, model: ModelVersion) -> Backend:
        started = time.perf_counter()
        backend = self.backend_factory(model, self.options)
        try:
            _warm_up(backend, model)
        except Exception:
            backend.close()
            raise
        log.info(
            "model %s:%s ready on %s in %.1fs", model.name, model.version, backend.name, time.perf_counter() - started
        )
        return backend

    @staticmethod
    def _vocab_size(model: ModelVersion, default: int) -> int:
        value = model.hf_config.get("vocab_size")
        return value if isinstance(value, int) and value > 0 else default

    def _select(self, model_ref: str) -> LoadedModel:
        """The slot a reference names; an unloaded version starts loading, and a bare name keeps its served one."""
        _, version = parse_reference(model_ref)
        model = self.repository.resolve(model_ref)
        slot = self._slots.get((model.name, model.version))
        if slot is None:
            slot = self._begin_load(model)
        if slot.state is not ModelState.READY and version is None:
            served = self._served.get(model.name)
            if served is not None:
                return self._slots[(model.name, served)]
        return slot

    def loaded(self, model_ref: str) -> LoadedModel:
        """The slot that serves a reference (tests and diagnostics)."""
        return self._select(model_ref)

    async def infer(
        self,
        model_ref: str,
        input_ids: IntArray,
        token_type_ids: IntArray | None,
        cu_seqlens: npt.NDArray[np.int32],
        deadline: float | None,
    ) -> tuple[ModelVersion, FloatArray]:
        """Runs a ragged batch through the model's batcher: [total_tokens, width] or [n, width] float32."""
        slot = self._select(model_ref)
        model = slot.model
        self._validate(model, input_ids, token_type_ids, cu_seqlens)
        if slot.state is not ModelState.READY or slot.batcher is None:
            detail = f": {slot.reason}" if slot.reason else ""
            raise errors.unavailable(
                f"model {model.name}:{model.version} is {slot.state}{detail}", model=model.name, version=model.version
            )
        if not slot.batcher.backend.uses_token_type_ids:
            token_type_ids = None
        output = await slot.batcher.submit(input_ids, token_type_ids, cu_seqlens, deadline)
        return model, output

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
                slot = self._select_quietly(name)
            except errors.TandemError as exc:
                out.append(self._describe_broken(name, str(exc)))
                continue
            if slot is None:
                out.append(self._describe_broken(name, self._broken.get(name, "not loaded"), versions))
            else:
                out.append(self._describe(slot, versions))
        return out

    def _select_quietly(self, name: str) -> LoadedModel | None:
        served = self._served.get(name)
        if served is not None:
            return self._slots[(name, served)]
        versions = self.repository.versions(name)
        return self._slots.get((name, versions[-1])) if versions else None

    def model(self, model_ref: str) -> ModelDescription:
        """One model, described by the version the reference names (or the one serving a bare name)."""
        slot = self._select(model_ref)
        return self._describe(slot, tuple(self.repository.versions(slot.model.name)))

    def _describe(self, slot: LoadedModel, versions: tuple[str, ...]) -> ModelDescription:
        model = slot.model
        ready = slot.state is ModelState.READY
        return ModelDescription(
            name=model.name,
            task=model.task,
            versions=versions,
            version=model.version,
            max_input_length=model.max_length,
            embedding_dimension=model.hidden_size if model.task is Task.EMBEDDING else 0,
            labels=model.labels if model.task is not Task.EMBEDDING else (),
            ready=ready,
            backend=slot.backend.name if slot.backend is not None else _backend_label(model.config),
            multi_label=model.multi_label,
            reason="" if ready else slot.reason or str(slot.state),
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

    async def close(self) -> None:
        """Stops every batcher (failing what is still queued) and the loader thread."""
        for slot in self._slots.values():
            if slot.task is not None and not slot.task.done():
                slot.task.cancel()
        for slot in self._slots.values():
            if slot.batcher is not None:
                await slot.batcher.close()
        await asyncio.to_thread(self._loader.shutdown, wait=True, cancel_futures=True)


def _backend_label(config: ModelConfig) -> str:
    return "torch" if config.backend == "torch" else OnnxBackend.name
