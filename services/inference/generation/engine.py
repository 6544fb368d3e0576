"""The decode loop of one text-generation model version: transformers' continuous batching (a paged KV cache, a
scheduler that lets sequences join and leave the running batch at every step, one background thread), with Tandem's
own admission by KV capacity, per-request sampling (sampler.py) and per-request async token streams.

Why transformers' engine and not our own: it gave token-identical greedy output to `generate()` alone and 16 at a
time, and 0.95x batched `generate()` throughput at 16 concurrent on SmolLM2 (docs/design/generation-research.md).
What it lacks is wrapped here: it dies on a request longer than its whole cache (so admission is ours), it never
reports a cancelled request (so a stream ends itself), and its sampling is global (so the sampler is ours).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import torch

from services.common import errors
from services.common.errors import Reason
from services.common.repository import GenerationSettings, ModelVersion
from services.inference.backends.base import cuda_present
from services.inference.generation.sampler import RequestSampler, SamplingParams, StepLogprobs

log = logging.getLogger(__name__)


class FinishReason(StrEnum):
    STOP = "stop"  # an end-of-sequence token
    LENGTH = "length"  # max_new_tokens
    STOP_SEQUENCE = "stop_sequence"  # one of the request's stop_token_ids


@dataclass(frozen=True)
class GeneratedTokens:
    """Tokens made since the previous chunk of a stream; the last chunk has `finish` set."""

    token_ids: list[int]
    logprobs: list[StepLogprobs]
    generated: int
    finish: FinishReason | None = None
    stop_token_id: int | None = None


class GenerationObserver(Protocol):
    """Where the engine reports per-token timings and counts (the stage's metrics)."""

    def first_token(self, seconds: float) -> None: ...

    def token_gap(self, seconds: float) -> None: ...

    def generated(self, tokens: int) -> None: ...


@dataclass(frozen=True)
class EngineStats:
    """Scrape-time gauges: sequences decoding and waiting, KV cache tokens reserved by admission and in use."""

    running: int
    waiting: int
    kv_reserved_tokens: int
    kv_used_tokens: int
    kv_capacity_tokens: int


@dataclass(eq=False)
class _Sequence:
    """One request on the event loop's side: tokens the engine thread handed over and not yet streamed."""

    request_id: str
    params: SamplingParams
    stop_ids: frozenset[int]
    eos_ids: frozenset[int]
    blocks: int
    started: float
    pending: list[int] = field(default_factory=list)
    received: int = 0
    streamed: int = 0
    finished: bool = False
    error: str | None = None
    last_token_at: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)


def eos_token_ids(model: ModelVersion) -> tuple[int, ...]:
    """The model's end-of-sequence ids: generation_config.json's, else config.json's."""
    path = model.path / "generation_config.json"
    value: Any = None
    if path.is_file():
        from services.common.repository import read_json

        value = read_json(path).get("eos_token_id")
    if value is None:
        value = model.hf_config.get("eos_token_id")
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    return tuple(int(i) for i in ids if isinstance(i, int) and i >= 0)


class GenerationEngine:
    """A causal LM in memory, its continuous-batching engine and the sequences it runs."""

    name = "torch"

    def __init__(
        self, model: ModelVersion, device: str, threads: int, observer: GenerationObserver | None = None
    ) -> None:
        from transformers import AutoModelForCausalLM

        if device == "cuda" and not cuda_present():
            raise ValueError("device 'cuda' is set but torch sees no CUDA GPU")
        torch.set_num_threads(threads)
        self.model_version = model
        self.device = torch.device("cuda" if device != "cpu" and cuda_present() else "cpu")
        settings = model.config.generation
        assert settings is not None  # ModelConfig fills it in for text-generation models
        self.settings: GenerationSettings = settings
        self.observer = observer
        hf: Any = AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch.float32, local_files_only=True)
        self.hf: Any = hf.to(self.device).eval()
        self.vocab = int(self.hf.get_output_embeddings().weight.shape[0])
        self.eos_ids = eos_token_ids(model)
        self.context = model.max_length
        self.page_size = settings.page_size
        self.total_blocks = max(1, math.ceil(settings.kv_cache_tokens / settings.page_size))
        self._sequences: dict[str, _Sequence] = {}
        self._reserved_blocks = 0
        self._ids = itertools.count()
        self._restart_lock = asyncio.Lock()
        self._manager: Any = None
        self._sampler: RequestSampler | None = None
        self._start_manager()

    # ------------------------------------------------------------------------------------------------------------------
    # The engine thread

    def _start_manager(self) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        pad = self.model_version.hf_config.get("pad_token_id")
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=False,
            max_new_tokens=self.settings.default_max_new_tokens,
            eos_token_id=list(self.eos_ids) or -1,
            pad_token_id=pad if isinstance(pad, int) else (self.eos_ids[0] if self.eos_ids else 0),
        )
        cb_config = ContinuousBatchingConfig(
            page_size=self.page_size,
            num_blocks=self.total_blocks,
            max_batch_tokens=self.settings.max_step_tokens,
            max_requests_per_batch=self.settings.max_running,
            # Finished sequences' blocks stay cached for prefix reuse with sharing on, so the cache would never show
            # free again; admission here counts reservations, which a finished or cancelled sequence returns.
            allow_block_sharing=False,
            # The sampler hook reads the batch from the synchronous input/output buffers.
            use_async_batching=False,
        )
        manager = self.hf.init_continuous_batching(generation_config=config, continuous_batching_config=cb_config)
        # The batch processor is made here, not lazily on the engine thread, so that its sampler can be replaced
        # before the first step (the thread reuses an existing processor).
        processor = manager._create_batch_processor()
        manager.batch_processor = processor
        sampler = RequestSampler(processor, self.device)
        processor.model_runner._sample = sampler
        # The engine thread runs its steps in inference mode when it is started in it (only no_grad otherwise).
        with torch.inference_mode():
            manager.start()
        self._manager, self._sampler = manager, sampler

    def warm_up(self) -> None:
        """Loader thread: one short generation through the engine, so the first request pays no lazy set-up."""
        manager = self._manager
        request_id = manager.add_request([0, 1], request_id="warm-up", max_new_tokens=2, eos_token_id=-1)
        if request_id is None:
            raise RuntimeError(f"the generation engine refused the warm-up request: {self._fatal_error()}")
        result = manager.get_result(request_id=request_id, timeout=300)
        if result is None or result.error:
            raise RuntimeError(f"warm-up generation failed: {result.error if result else 'no result in 300 s'}")

    def _fatal_error(self) -> str:
        error = getattr(self._manager.background_thread_status, "fatal_error", None)
        return repr(error) if error is not None else "the engine thread is not running"

    async def _ensure_running(self) -> None:
        if self._manager.is_running():
            return
        async with self._restart_lock:
            if self._manager.is_running():
                return
            log.error(
                "generation engine of %s stopped (%s): restarting it", self.model_version.ref, self._fatal_error()
            )
            for sequence in self._sequences.values():
                sequence.error = "the generation engine restarted"
                sequence.wake.set()
            old = self._manager
            await asyncio.to_thread(lambda: old.stop(block=True, timeout=5.0, hard_stop=True))
            await asyncio.to_thread(self._start_manager)

    # ------------------------------------------------------------------------------------------------------------------
    # Requests

    def _admit(self, prompt_tokens: int, params: SamplingParams) -> int:
        """KV blocks the sequence reserves (prompt and every token it may generate); refuses what does not fit."""
        blocks = math.ceil((prompt_tokens + params.max_new_tokens) / self.page_size)
        if blocks > self.total_blocks:
            raise errors.invalid_argument(
                f"the prompt's {prompt_tokens} tokens and max_new_tokens {params.max_new_tokens} need"
                f" {blocks * self.page_size} KV cache tokens; {self.model_version.name} holds"
                f" {self.total_blocks * self.page_size} (tandem.json generation.kv_cache_tokens)",
                "params.max_new_tokens",
                reason=Reason.INPUT_TOO_LONG,
            )
        limit = self.settings.max_running + self.settings.max_waiting
        if len(self._sequences) >= limit:
            raise errors.resource_exhausted(
                f"{self.model_version.ref} has {len(self._sequences)} sequences running or waiting, its limit"
                " (generation.max_running + max_waiting); retry later",
                retry_after_s=self._retry_after_s(),
                model=self.model_version.name,
            )
        if self._reserved_blocks + blocks > self.total_blocks:
            raise errors.resource_exhausted(
                f"the KV cache of {self.model_version.ref} is full: {self._reserved_blocks * self.page_size} of"
                f" {self.total_blocks * self.page_size} tokens are reserved and this sequence needs"
                f" {blocks * self.page_size}; retry later",
                retry_after_s=self._retry_after_s(),
                model=self.model_version.name,
            )
        self._reserved_blocks += blocks
        return blocks

    def _retry_after_s(self) -> float:
        # Roughly when a running sequence may end: the shortest remaining budget at a guessed 20 tokens/s.
        remaining = [s.params.max_new_tokens - s.received for s in self._sequences.values()]
        return min(5.0, max(0.05, min(remaining, default=1) / 20.0))

    async def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, deadline: float | None
    ) -> AsyncGenerator[GeneratedTokens, None]:
        """Streams the tokens of one sequence. Closing the iterator early (the caller went away, a stop string
        matched upstream) cancels the sequence; the engine drops it and frees its blocks at the next step."""
        await self._ensure_running()
        blocks = self._admit(len(prompt_ids), params)
        stop_ids = frozenset(params.stop_token_ids)
        eos_ids = frozenset(() if params.ignore_eos else self.eos_ids)
        request_id = f"gen-{next(self._ids)}"
        sequence = _Sequence(request_id, params, stop_ids, eos_ids, blocks, time.perf_counter())
        self._sequences[request_id] = sequence
        manager, sampler = self._manager, self._sampler
        assert sampler is not None
        ending = sorted(stop_ids | eos_ids)
        sampler.register(request_id, params, tuple(ending))
        added = False
        try:
            manager.register_result_handler(request_id, lambda output: self._on_output(sequence, output))
            added = (
                manager.add_request(
                    list(prompt_ids),
                    request_id=request_id,
                    max_new_tokens=params.max_new_tokens,
                    streaming=True,
                    eos_token_id=ending or -1,
                )
                is not None
            )
            if not added:
                raise errors.unavailable(
                    f"the generation engine of {self.model_version.ref} is restarting", retry_after_s=0.5
                )
            async for chunk in self._stream(sequence, deadline):
                yield chunk
        finally:
            if added and not sequence.finished:
                manager.cancel_request(request_id)
            with manager.output_router._lock:
                manager.output_router.result_handlers.pop(request_id, None)
            sampler.forget(request_id)
            self._sequences.pop(request_id, None)
            self._reserved_blocks -= blocks

    async def _stream(self, sequence: _Sequence, deadline: float | None) -> AsyncIterator[GeneratedTokens]:
        sampler = self._sampler
        assert sampler is not None
        while True:
            if not sequence.pending and not sequence.finished and sequence.error is None:
                sequence.wake.clear()
                try:
                    # timeout_at takes the loop's clock, which is time.monotonic (the deadline's clock).
                    async with asyncio.timeout_at(deadline):
                        await sequence.wake.wait()
                except TimeoutError:
                    raise errors.deadline_exceeded(
                        f"deadline exceeded after {sequence.received} generated tokens",
                        model=self.model_version.name,
                    ) from None
            if sequence.error is not None and not sequence.finished:
                log.error("generation of %s failed: %s", self.model_version.ref, sequence.error)
                raise errors.internal()
            tokens, sequence.pending = sequence.pending, []
            start = sequence.streamed
            sequence.streamed += len(tokens)
            logprobs = (
                sampler.logprobs(sequence.request_id, start, sequence.streamed) if sequence.params.logprobs else []
            )
            if sequence.finished and not sequence.pending:
                finish, stop_id = self._finish_reason(sequence, tokens)
                yield GeneratedTokens(tokens, logprobs, sequence.streamed, finish, stop_id)
                return
            if tokens:
                yield GeneratedTokens(tokens, logprobs, sequence.streamed)

    def _finish_reason(self, sequence: _Sequence, last: list[int]) -> tuple[FinishReason, int | None]:
        final = last[-1] if last else None
        if final is not None and final in sequence.stop_ids:
            return FinishReason.STOP_SEQUENCE, final
        if final is not None and final in sequence.eos_ids:
            return FinishReason.STOP, None
        return FinishReason.LENGTH, None

    def _on_output(self, sequence: _Sequence, output: Any) -> None:
        """Event loop (call_soon_threadsafe from the engine thread): the sequence's cumulative tokens so far."""
        generated = output.generated_tokens
        new = generated[sequence.received :]
        if new:
            now = time.perf_counter()
            if self.observer is not None:
                if sequence.received == 0:
                    self.observer.first_token(now - sequence.started)
                else:
                    self.observer.token_gap((now - sequence.last_token_at) / len(new))
                self.observer.generated(len(new))
            sequence.last_token_at = now
            sequence.pending.extend(new)
            sequence.received = len(generated)
        if output.error:
            sequence.error = str(output.error)
        elif output.is_finished():
            sequence.finished = True
        sequence.wake.set()

    # ------------------------------------------------------------------------------------------------------------------
    # State

    @property
    def in_flight(self) -> int:
        return len(self._sequences)

    def stats(self) -> EngineStats:
        """Read from the metrics thread: counts may be a step stale, never torn."""
        processor = getattr(self._manager, "batch_processor", None)
        running = waiting = used = 0
        capacity = self.total_blocks * self.page_size
        if processor is not None:
            with contextlib.suppress(RuntimeError, AttributeError):
                running = len(processor.scheduler.active_requests)
                waiting = len(processor.scheduler.waiting_requests)
                used = round((1.0 - float(processor.cache.compute_free_capacity(relative=True))) * capacity)
        return EngineStats(running, waiting, self._reserved_blocks * self.page_size, used, capacity)

    def close(self) -> None:
        """Stops the engine thread (what still runs fails) and frees the model."""
        for sequence in self._sequences.values():
            sequence.error = "the model is unloading"
            sequence.wake.set()
        manager = self._manager
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.stop(block=True, timeout=10.0, hard_stop=True)
        self._manager = None
        del self.hf
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
