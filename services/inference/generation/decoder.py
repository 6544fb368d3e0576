"""The decode loop of a text-generation model: one thread that keeps a running batch of sequences in one batched
KV cache and advances all of them by one token per step, letting new sequences join and finished or cancelled ones
leave between steps (continuous batching).

Why not transformers' continuous batching: measured on CPU (docs/benchmarks/2026-12-04/NOTES.md), its paged
attention path (a gather of every sequence's KV per layer and a dense float mask) made a step 10-15 ms slower than
`generate()` at one sequence and about 20 % slower per token at 16. This loop runs exactly the forward that batched
`generate()` runs: the batch is left-padded to a common length, with the attention mask and per-row positions that
`generate()` computes, so a step costs what the bare model's batched decode step costs.

- **Join**: waiting sequences' prompts are prefilled together as one left-padded batch (at most `max_step_tokens`
  padded tokens between two steps, at least one prompt, which bounds what joins add to the running sequences'
  inter-token latency), their first tokens chosen, and their cache is left-padded (or the batch's is) to a common
  length and concatenated to the batch.
- **Leave**: the rows of finished or cancelled sequences are dropped from the cache and the mask before the next
  step, and columns that only padding holds any more are trimmed.
- Tokens are chosen per sequence by the RequestSampler; they reach the event loop with one
  `call_soon_threadsafe` per step.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from services.inference.generation.sampler import RequestSampler, SamplingParams

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Row:
    """One sequence in the decode loop (engine thread only). The sampler reads `request_id`, `initial_tokens` and
    `generated_tokens`."""

    request_id: str
    initial_tokens: list[int]
    params: SamplingParams
    # Ids that end the sequence (end-of-sequence unless ignored, and the request's stop ids).
    ending: frozenset[int]
    generated_tokens: list[int] = field(default_factory=list)
    done: bool = False

    def take(self, token: int) -> None:
        self.generated_tokens.append(token)
        if token in self.ending or len(self.generated_tokens) >= self.params.max_new_tokens:
            self.done = True


# What the loop hands to the event loop after each step: (request id, new token ids, finished, error or None).
Update = tuple[str, list[int], bool, str | None]


class DecodeLoop:
    """The running batch and the thread that advances it."""

    def __init__(
        self,
        model: Any,
        device: torch.device,
        sampler: RequestSampler,
        deliver: Callable[[list[Update]], None],
        *,
        max_running: int,
        max_step_tokens: int,
        name: str,
    ) -> None:
        self.model = model
        self.device = device
        self.sampler = sampler
        self.deliver = deliver
        self.max_running = max_running
        self.max_step_tokens = max_step_tokens
        self._inbox: queue.SimpleQueue[Row | None] = queue.SimpleQueue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.rows: list[Row] = []
        self.waiting: list[Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, columns] of 0 (padding) and 1
        self.fatal: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"tandem-decode-{name}", daemon=True)

    # ------------------------------------------------------------------------------------------------------------------
    # Any thread

    def start(self) -> None:
        self._thread.start()

    def submit(self, row: Row) -> None:
        self._inbox.put(row)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self._inbox.put(None)
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.fatal is None

    @property
    def cached_tokens(self) -> int:
        """Positions the batched cache holds, padding included (rows x columns)."""
        mask = self._mask
        return 0 if mask is None else int(mask.shape[0] * mask.shape[1])

    # ------------------------------------------------------------------------------------------------------------------
    # The engine thread

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping:
                    self._take_inbox()
                    self._drop_cancelled()
                    if not self.rows and not self.waiting:
                        self._wake.wait(0.1)
                        self._wake.clear()
                        continue
                    updates: list[Update] = []
                    self._join(updates)
                    if updates:
                        # The joining sequences' first tokens go out now rather than with the next step's: their
                        # time to first token is their prefill, not prefill + a decode step (a whole inter-token
                        # time: on an H200 it was 20 ms of a 40 ms TTFT, docs/benchmarks/2026-12-04/gpu.md).
                        self.deliver(updates)
                        updates = []
                    if self.rows:
                        self._step(updates)
                    self._leave()
                    if updates:
                        self.deliver(updates)
        except BaseException as exc:  # the loop must never die silently: every running sequence fails with it
            log.exception("the decode loop failed")
            self.fatal = exc
            failed: list[Update] = [(r.request_id, [], True, repr(exc)) for r in (*self.rows, *self.waiting)]
            self.rows, self.waiting, self._cache, self._mask = [], [], None, None
            if failed:
                self.deliver(failed)

    def _take_inbox(self) -> None:
        while True:
            try:
                row = self._inbox.get_nowait()
            except queue.Empty:
                return
            if row is not None:
                self.waiting.append(row)

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        self.waiting = [r for r in self.waiting if r.request_id not in cancelled]
        for row in self.rows:
            if row.request_id in cancelled:
                row.done = True
        self._leave()

    def _join(self, updates: list[Update]) -> None:
        """Prefills waiting sequences together, as one left-padded batch (at most `max_step_tokens` padded tokens, at
        least one sequence), and adds them to the running batch."""
        group: list[Row] = []
        longest = 0
        while self.waiting and len(self.rows) + len(group) < self.max_running:
            length = max(longest, len(self.waiting[0].initial_tokens))
            if group and length * (len(group) + 1) > self.max_step_tokens:
                break
            group.append(self.waiting.pop(0))
            longest = length
        if not group:
            return
        ids = torch.tensor(
            [[0] * (longest - len(r.initial_tokens)) + r.initial_tokens for r in group],
            dtype=torch.long,
            device=self.device,
        )
        mask = torch.tensor(
            [[0] * (longest - len(r.initial_tokens)) + [1] * len(r.initial_tokens) for r in group],
            dtype=torch.long,
            device=self.device,
        )
        # As generate() computes them for a left-padded batch: positions count real tokens; padding gets 1.
        positions = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        tokens = self.sampler.choose(out.logits[:, -1, :].float(), group)
        for row, token in zip(group, tokens, strict=True):
            row.take(token)
            updates.append((row.request_id, [token], row.done, None))
        self._append(group, out.past_key_values, mask)

    def _append(self, group: list[Row], cache: Any, mask: torch.Tensor) -> None:
        """Adds prefilled sequences' cache to the batch's, both left-padded to the longer length (sequences that
        already finished with their first token stay out)."""
        keep = [i for i, r in enumerate(group) if not r.done]
        if not keep:
            return
        if len(keep) < len(group):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            cache = type(cache)(
                ddp_cache_data=[
                    (layer.keys.index_select(0, index), layer.values.index_select(0, index)) for layer in cache.layers
                ]
            )
            mask = mask.index_select(0, index)
            group = [group[i] for i in keep]
        if self._cache is None or self._mask is None:
            self.rows, self._cache, self._mask = list(group), cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        layers = []
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            layers.append(
                (
                    torch.cat((_pad_left(old.keys, width), _pad_left(new.keys, width)), dim=0),
                    torch.cat((_pad_left(old.values, width), _pad_left(new.values, width)), dim=0),
                )
            )
        self._cache = type(self._cache)(ddp_cache_data=layers)
        self._mask = torch.cat(
            (F.pad(self._mask, (width - self._mask.shape[1], 0)), F.pad(mask, (width - mask.shape[1], 0)))
        )
        self.rows.extend(group)

    def _step(self, updates: list[Update]) -> None:
        """One token for every running sequence."""
        assert self._mask is not None
        last = torch.tensor([[r.generated_tokens[-1]] for r in self.rows], dtype=torch.long, device=self.device)
        self._mask = torch.cat((self._mask, torch.ones((len(self.rows), 1), dtype=torch.long, device=self.device)), 1)
        # As generate() computes them: the position of a row's new token is the number of real tokens before it.
        positions = self._mask.sum(dim=1, keepdim=True) - 1
        out = self.model(
            input_ids=last,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        )
        self._cache = out.past_key_values
        tokens = self.sampler.choose(out.logits[:, -1, :].float(), self.rows)
        for row, token in zip(self.rows, tokens, strict=True):
            row.take(token)
            updates.append((row.request_id, [token], row.done, None))

    def _leave(self) -> None:
        """Drops finished rows from the batch, and the columns only padding holds any more."""
        if not any(r.done for r in self.rows):
            return
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if not keep:
            self.rows, self._cache, self._mask = [], None, None
            return
        assert self._mask is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int(torch.nonzero(mask.any(dim=0), as_tuple=False)[0, 0])
        layers = [
            (
                layer.keys.index_select(0, index)[:, :, first:, :],
                layer.values.index_select(0, index)[:, :, first:, :],
            )
            for layer in self._cache.layers
        ]
        self._cache = type(self._cache)(ddp_cache_data=layers)
        self._mask = mask[:, first:]
        self.rows = [self.rows[i] for i in keep]


def _pad_left(states: torch.Tensor, width: int) -> torch.Tensor:
    """[batch, heads, length, dim] padded with zeros on the left of the length axis to `width`."""
    missing = width - states.shape[2]
    return states if missing == 0 else F.pad(states, (0, 0, missing, 0))


__all__ = ["DecodeLoop", "Row", "Update"]
