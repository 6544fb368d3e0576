"""One model version in memory: its lifecycle state, and how it is loaded (backend, tokenizer check, warm-up,
measured call cost)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np

from services.common.repository import METADATA_FILE, ModelConfig, ModelVersion, Task, tokenizer_fingerprint
from services.inference.backends.base import Backend, BackendOptions, token_level
from services.inference.backends.onnx import OnnxBackend, onnx_providers
from services.inference.backends.torch import TorchBackend
from services.inference.batching.batcher import Batcher, BatchObserver
from services.inference.batching.planner import measure_call_cost
from services.inference.export.onnx import ensure_onnx
from services.inference.generation.engine import GenerationEngine, GenerationObserver


class ModelObserver(BatchObserver, GenerationObserver, Protocol):
    """Where a loaded version reports: its batcher's calls, or its generation engine's tokens."""


log = logging.getLogger(__name__)


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
    # Text-generation versions run in a generation engine instead of a backend and batcher.
    engine: GenerationEngine | None = None
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
        return (
            self.state in (ModelState.READY, ModelState.UNLOADING)
            and not self.refusing
            and (self.batcher is not None or self.engine is not None)
        )

    @property
    def pending(self) -> int:
        """Sequences admitted and not yet answered."""
        if self.engine is not None:
            return self.engine.in_flight
        return self.batcher.pending if self.batcher is not None else 0

    @property
    def capacity(self) -> int:
        """The most sequences admitted at once, beyond which requests are refused with RESOURCE_EXHAUSTED; 0 while
        nothing can take them."""
        if self.engine is not None:
            return self.engine.settings.max_running + self.engine.settings.max_waiting
        return self.model.config.max_queue_size if self.batcher is not None else 0


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


def backend_label(config: ModelConfig) -> str:
    """The name of the backend a version's tandem.json asks for, before one is loaded."""
    return "torch" if config.backend == "torch" else OnnxBackend.name


def warm_up(backend: Backend, model: ModelVersion) -> None:
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


def checked_fingerprint(model: ModelVersion) -> str:
    """The version folder's tokenizer fingerprint, which must equal the one its metadata.json recorded."""
    fingerprint = tokenizer_fingerprint(model.path)
    recorded = model.metadata.tokenizer_fingerprint if model.metadata is not None else ""
    if recorded and fingerprint != recorded:
        raise ValueError(
            f"the tokenizer files ({fingerprint}) differ from the tokenizer {METADATA_FILE} recorded ({recorded})"
        )
    return fingerprint


def load_version(
    model: ModelVersion, options: BackendOptions, backend_factory: BackendFactory = create_backend
) -> tuple[Backend, str, float]:
    """Worker thread: (the version's warmed-up backend, its tokenizer fingerprint, what one model call costs in
    padded tokens: tandem.json's or measured now). Fails, with nothing left open, when any step fails."""
    started = time.perf_counter()
    fingerprint = checked_fingerprint(model)
    backend = backend_factory(model, options)
    try:
        warm_up(backend, model)
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
        options.instances_of(model),
        options.threads_of(model),
        f", {options.alone_threads_of(model)} for a lone call" if backend.runs_alone else "",
        call_cost,
    )
    return backend, fingerprint, call_cost


def load_generation(
    model: ModelVersion, options: BackendOptions, observer: GenerationObserver | None = None
) -> tuple[GenerationEngine, str]:
    """Worker thread: (the text-generation version's warmed-up engine, its tokenizer fingerprint)."""
    started = time.perf_counter()
    fingerprint = checked_fingerprint(model)
    engine = GenerationEngine(model, options.device or model.config.device, options.intra_op_threads, observer)
    try:
        engine.warm_up()
    except Exception:
        engine.close()
        raise
    settings = engine.settings
    log.info(
        "model %s ready for generation on %s in %.1fs (KV budget %d tokens in pages of %d, %d sequences a step)",
        model.ref,
        engine.device,
        time.perf_counter() - started,
        engine.total_blocks * engine.page_size,
        settings.page_size,
        settings.max_running,
    )
    return engine, fingerprint


def vocab_size(model: ModelVersion, default: int) -> int:
    """The version's vocabulary size from its config.json, or `default` where it names none."""
    value = model.hf_config.get("vocab_size")
    return value if isinstance(value, int) and value > 0 else default


def start_batcher(
    model: ModelVersion,
    backend: Backend,
    options: BackendOptions,
    call_cost_tokens: float,
    nice: int = 0,
    observer: BatchObserver | None = None,
) -> Batcher:
    """The batcher that serves a loaded version: its instances, measured call cost and pooling, and a pad id."""
    pad = model.hf_config.get("pad_token_id")
    # Padded positions are masked out; the id only has to be a valid embedding row.
    pad_id = pad if isinstance(pad, int) and 0 <= pad < vocab_size(model, pad + 1) else 0
    return Batcher(
        backend,
        model.config,
        model.ref,
        pad_id,
        observer,
        instances=options.instances_of(model),
        call_cost_tokens=call_cost_tokens,
        nice=nice,
        pooling=model.pooling,
        inline_ms=options.inline_lone_ms,
    )
