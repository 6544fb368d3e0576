"""Per-request token choice for the decode loop: every sequence in a step gets its own temperature, top-k, top-p,
repetition penalty, minimum length, random generator and top-n log-probabilities.

Transformers' continuous batching samples with one global configuration (do_sample and the seed are shared by the
whole batch, and it drops repetition_penalty and min_new_tokens): docs/design/generation-research.md measured that
the same seed gives other text next to other requests. Here each request has its own parameters and its own
torch.Generator, so a seeded request gives the same text whatever else runs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    """One request's token choice, validated (see params.resolve)."""

    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class StepLogprobs:
    """The chosen token's log-probability and the most likely tokens at one step, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass
class _Entry:
    params: SamplingParams
    # End-of-sequence ids suppressed until min_new_tokens are generated.
    eos: tuple[int, ...]
    generator: torch.Generator | None
    # Written by the engine thread, read by the event loop by index (appends are atomic).
    logprobs: list[StepLogprobs] = field(default_factory=list)


class RequestSampler:
    """Chooses the next token of each sequence of a step with the sequence's own parameters."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def register(self, request_id: str, params: SamplingParams, eos: tuple[int, ...]) -> None:
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self._device)
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:
                generator.seed()
        with self._lock:
            self._entries[request_id] = _Entry(params, eos, generator)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._entries.pop(request_id, None)

    def logprobs(self, request_id: str, start: int, stop: int) -> list[StepLogprobs]:
        """The log-probabilities of generated tokens start..stop-1 of a request (empty when none were asked for)."""
        entry = self._entries.get(request_id)
        return [] if entry is None else entry.logprobs[start:stop]

    def choose(self, logits: torch.Tensor, states: Sequence[Any]) -> list[int]:
        """The next token of each sequence: `logits` [rows, vocab] float32, one row per state, in order. A state has
        `request_id`, `initial_tokens` (the prompt) and `generated_tokens`."""
        with self._lock:
            entries = [self._entries.get(s.request_id) for s in states]
        chosen = torch.argmax(logits, dim=-1)  # the answer for every plain greedy row, in one call
        for row, (state, entry) in enumerate(zip(states, entries, strict=True)):
            if entry is None or (entry.params.greedy and _plain(entry, state)):
                continue
            chosen[row] = self._choose(logits[row], state, entry)
        return [int(t) for t in chosen.tolist()]

    def _choose(self, row: torch.Tensor, state: Any, entry: _Entry) -> int:
        params = entry.params
        x = row
        if params.repetition_penalty != 1.0:
            # As transformers' RepetitionPenaltyLogitsProcessor: over every token of the prompt and the answer.
            x = x.clone()
            seen = torch.tensor(sorted({*state.initial_tokens, *state.generated_tokens}), device=x.device)
            values = x[seen]
            x[seen] = torch.where(values < 0, values * params.repetition_penalty, values / params.repetition_penalty)
        if entry.eos and len(state.generated_tokens) < params.min_new_tokens:
            x = x.clone() if x is row else x
            x[list(entry.eos)] = -float("inf")
        token = int(torch.argmax(x)) if params.greedy else self._sample(x, params, entry.generator)
        if params.logprobs:
            logprobs = torch.log_softmax(x, dim=-1)
            top = torch.topk(logprobs, params.logprobs)
            entry.logprobs.append(
                StepLogprobs(
                    token,
                    float(logprobs[token]),
                    tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)),
                )
            )
        return token

    @staticmethod
    def _sample(x: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
        x = x / params.temperature
        if params.top_k and params.top_k < x.numel():
            kth = torch.topk(x, params.top_k).values[-1]
            x = x.masked_fill(x < kth, -float("inf"))
        if params.top_p < 1.0:
            # As transformers' TopPLogitsWarper: drop the least likely tokens whose mass adds up to at most 1 - top_p.
            ordered, order = torch.sort(x, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - params.top_p)
            remove[-1] = False
            x = x.masked_fill(remove.scatter(0, order, remove), -float("inf"))
        return int(torch.multinomial(x.softmax(dim=-1), 1, generator=generator))


def _plain(entry: _Entry, state: Any) -> bool:
    """A greedy row the batch-wide argmax answers: no penalty, no suppressed EOS, no log-probabilities."""
    params = entry.params
    return (
        params.repetition_penalty == 1.0
        and not params.logprobs
        and not (entry.eos and len(state.generated_tokens) < params.min_new_tokens)
    )
