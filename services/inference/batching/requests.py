"""A caller's ragged batch as the batcher holds it, from admission until its output rows are complete."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from services.common.priority import DEFAULT, Priority
from services.inference.backends.base import FloatArray, IntArray


@dataclass(eq=False)
class Request:
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
    # Which level the batcher serves it at (services/common/priority.py).
    priority: Priority = DEFAULT

    @property
    def count(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return int(self.lengths.sum())
