"""One text-generation model version in memory: its decode loop (decoder.py, continuous batching over one
batched KV cache), admission by KV capacity, per-request sampling (sampler.py) and per-request async token streams.

The event loop never waits on the model: requests go to the decode loop's thread, tokens come back with one
`call_soon_threadsafe` per step, and each stream takes what arrived since it last looked.
"""

from __future__ import annotations

import asyncio
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
from services.inference.backends.torch import torch_dtype
from services.inference.generation.decoder import DecodeLoop, Row, Update
from services.inference.generation.params import ModelDefaults, model_defaults
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
    """A causal LM in memory, its decode loop and the sequences it runs."""

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
        hf: Any = AutoModelForCausalLM.from_pretrained(
            str(model.path), dtype=torch_dtype(model.config.dtype), local_files_only=True
        )
        self.hf: Any = hf.to(self.device).eval()
        self.vocab = int(self.hf.get_output_embeddings().weight.shape[0])
        self.eos_ids = eos_token_ids(model)
        # Unset request parameters: the model's generation_config.json (ValueError, so a broken load, if it asks for
        # what no request could).
        self.defaults: ModelDefaults = model_defaults(model.path)
        # tandem.json's default_max_new_tokens when it sets one, else the model's own, else the setting's default.
        self.default_max_new_tokens = (
            settings.default_max_new_tokens
            if "default_max_new_tokens" in settings.model_fields_set or self.defaults.max_new_tokens is None
            else self.defaults.max_new_tokens
        )
        self.page_size = settings.page_size
        self.total_blocks = max(1, math.ceil(settings.kv_cache_tokens / settings.page_size))
        self._sequences: dict[str, _Sequence] = {}
        self._reserved_blocks = 0
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sampler = RequestSampler(self.device)
        self._decoder = self._new_decoder()

    def _new_decoder(self) -> DecodeLoop:
        decoder = DecodeLoop(
            self.hf,
            self.device,
            self._sampler,
            self._deliver,
            max_running=self.settings.max_running,
            max_step_tokens=self.settings.max_step_tokens,
            name=self.model_version.ref,
        )
        decoder.start()
        return decoder

    def warm_up(self) -> None:
        """Loader thread: one short generation through the model (prefill and a decode step), so the first request
        pays no lazy set-up."""
        with torch.inference_mode():
            ids = torch.tensor([[0, 1]], dtype=torch.long, device=self.device)
            out = self.hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            self.hf(
                input_ids=ids[:, -1:],
                attention_mask=torch.ones((1, 3), dtype=torch.long, device=self.device),
                position_ids=torch.tensor([[2]], device=self.device),
                past_key_values=out.past_key_values,
                use_cache=True,
            )

    async def _ensure_running(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._decoder.alive:
            return
        log.error("the decode loop of %s stopped (%r): starting a new one", self.model_version.ref, self._decoder.fatal)
        for sequence in self._sequences.values():
            sequence.error = sequence.error or "the decode loop restarted"
            sequence.wake.set()
        self._decoder.stop(timeout_s=0)
        self._decoder = self._new_decoder()

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
        matched upstream) cancels the sequence; the decode loop drops it before its next step."""
        await self._ensure_running()
        blocks = self._admit(len(prompt_ids), params)
        stop_ids = frozenset(params.stop_token_ids)
        eos_ids = frozenset(() if params.ignore_eos else self.eos_ids)
        request_id = f"gen-{next(self._ids)}"
        sequence = _Sequence(request_id, params, stop_ids, eos_ids, blocks, time.perf_counter())
        self._sequences[request_id] = sequence
        ending = stop_ids | eos_ids
        self._sampler.register(request_id, params, tuple(sorted(ending)))
        decoder = self._decoder
        try:
            decoder.submit(Row(request_id, list(prompt_ids), params, ending))
            async for chunk in self._stream(sequence, deadline):
                yield chunk
        finally:
            if not sequence.finished:
                decoder.cancel(request_id)
            self._sampler.forget(request_id)
            self._sequences.pop(request_id, None)
            self._reserved_blocks -= blocks

    async def _stream(self, sequence: _Sequence, deadline: float | None) -> AsyncIterator[GeneratedTokens]:
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
            if sequence.error is not None:
                log.error("generation of %s failed: %s", self.model_version.ref, sequence.error)
                raise errors.internal()
            tokens, sequence.pending = sequence.pending, []
            start = sequence.streamed
            sequence.streamed += len(tokens)
            logprobs = []
            if sequence.params.logprobs:
                logprobs = self._sampler.logprobs(sequence.request_id, start, sequence.streamed)
            if sequence.finished:
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

    def _deliver(self, updates: list[Update]) -> None:
        """Decode thread: hands a step's tokens to the event loop (one callback per step)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_updates, updates)

    def _on_updates(self, updates: list[Update]) -> None:
        """Event loop: each sequence's new tokens; a stream that went away meanwhile is skipped."""
        now = time.perf_counter()
        for request_id, new, finished, error in updates:
            sequence = self._sequences.get(request_id)
            if sequence is None:
                continue
            if new:
                if self.observer is not None:
                    if sequence.received == 0:
                        self.observer.first_token(now - sequence.started)
                    else:
                        self.observer.token_gap((now - sequence.last_token_at) / len(new))
                    self.observer.generated(len(new))
                sequence.last_token_at = now
                sequence.pending.extend(new)
                sequence.received += len(new)
            if error is not None:
                sequence.error = error
            elif finished:
                sequence.finished = True
            sequence.wake.set()

    # ------------------------------------------------------------------------------------------------------------------
    # State

    @property
    def in_flight(self) -> int:
        return len(self._sequences)

    def stats(self) -> EngineStats:
        """Read from the metrics thread: counts may be a step stale, never torn."""
        decoder = self._decoder
        return EngineStats(
            running=len(decoder.rows),
            waiting=len(decoder.waiting),
            kv_reserved_tokens=self._reserved_blocks * self.page_size,
            kv_used_tokens=decoder.cached_tokens,
            kv_capacity_tokens=self.total_blocks * self.page_size,
        )

    def close(self) -> None:
        """Stops the decode loop (what still runs fails) and frees the model."""
        for sequence in self._sequences.values():
            sequence.error = "the model is unloading"
            sequence.wake.set()
        self._decoder.stop()
        del self.hf
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
