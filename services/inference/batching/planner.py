"""How a round of queued sequences is cut into model calls, and the measured per-call cost that drives the cut."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from services.common.repository import ModelConfig, ModelVersion
from services.inference.backends.base import Backend

# What a batcher assumes a model call costs, in padded tokens, when nobody measured it (the stage measures each
# version as it loads: CPU models come out at 5-15, GPU models far higher).
DEFAULT_CALL_COST_TOKENS = 16.0


def cut(lengths: npt.NDArray[np.int64], config: ModelConfig, call_cost_tokens: float) -> list[npt.NDArray[np.intp]]:
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
            rows + 1 > config.max_batch_size
            or (rows + 1) * longer > config.max_batch_tokens
            or rows * (longer - ordered[end - 1]) > call_cost_tokens
        ):
            calls.append(order[start:end])
            start = end
    calls.append(order[start:])
    return calls


def measure_call_cost(
    backend: Backend,
    model: ModelVersion,
    rows: int = 8,
    length: int = 16,
    repeats: int = 15,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """The model's fixed cost per call in padded tokens: what one more call costs beyond the tokens it carries.

    Fitted from the median times of 1 x `length` and `rows` x `length` calls, run alternately so that a change in the
    machine's speed while it measures (other stages start at the same time) hits both sizes alike: measured one
    size after the other, five times each, twelve restarts of `tandem serve` gave 5.7 to 14.3 tokens; in turn,
    fifteen times each, eight gave 7.9 to 10.4. The
    batcher cuts a round where padding would cost more than this: on CPU a call costs a few tokens
    (all-MiniLM-L6-v2, one thread: about 7), so sequences of different lengths run apart; on a GPU a call costs
    thousands and rounds stay whole. `clock` times the calls (a test gives its own).
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
            started = clock()
            backend.run(*inputs)
            times[batch].append(clock() - started)
    one, many = float(np.median(times[1])), float(np.median(times[rows]))
    per_token = (many - one) / ((rows - 1) * length)
    if per_token <= 0:  # as fast for many rows as for one: no padding is worth a call
        return float(model.config.max_batch_tokens)
    fixed = max(one - per_token * length, 0.0)
    return min(fixed / per_token, float(model.config.max_batch_tokens))
