"""Merges concurrent gateway requests for the same model and options into one pipeline run.

An idle key starts at once, so a lone request waits for nothing; requests that arrive while runs are in flight
queue up and leave together as the next run. One tokenizer, one inference and one postprocess call then serve
many callers, and each caller gets back exactly its own slice of the result, and the run's stage timings.

Waiting callers are served by priority (the caller's `gateway.priority.current_priority`), weighted so that a steady
stream of high-priority requests never starves the low ones (services/common/priority.py); a run merges callers of
one level and goes through the stages at that level. Admission keeps the last places for higher levels, so under
overload the low-priority callers are the ones refused; and when every run slot is taken, high-priority callers get
runs of their own beyond them (express runs, up to as many again), so they wait for no low-priority run to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from opentelemetry import trace

from gateway.priority import current_priority
from services.common import errors, timing, tracing
from services.common.errors import Reason
from services.common.priority import ADMISSION_SHARES, Priority, WeightedQueue, admits

log = logging.getLogger(__name__)

Key = TypeVar("Key", bound=Hashable)

# Bounds of the RetryInfo delay a refusal at the gateway suggests.
MIN_RETRY_S = 0.05
MAX_RETRY_S = 2.0
# How far either way, as a share of itself, a RetryInfo delay under the cap is spread at random (see _delay).
RETRY_JITTER = 0.5
Result = TypeVar("Result")


@dataclass
class _Waiter(Generic[Result]):
    inputs: Sequence[str]
    future: asyncio.Future[Result]
    deadline: float
    span: trace.Span = trace.INVALID_SPAN
    # The caller's own call record, which gets the stage timings of the run that served it.
    record: timing.CallRecord | None = None
    submitted: float = 0.0
    priority: Priority = Priority.NORMAL


class Coalescer(Generic[Key, Result]):
    """`run(key, inputs, deadline)` does one merged pipeline run; `split(result, counts)` cuts it per caller."""

    def __init__(
        self,
        run: Callable[[Key, list[str], float], Awaitable[Result]],
        split: Callable[[Result, list[int]], list[Result]],
        *,
        max_inputs: int = 256,
        max_inflight: int = 2,
        max_queued: int | None = None,
        cap_ttl_s: float = 60.0,
        retry_jitter: float = RETRY_JITTER,
        rng: random.Random | None = None,
    ) -> None:
        self._run_fn = run
        self._split = split
        self.max_inputs = max_inputs
        # Runs per key in flight at once: enough to keep every model instance busy while another run is tokenized
        # or postprocessed (the gateway sets it from --coalesce-max-runs).
        self.max_inflight = max_inflight
        # Admission control: past this many inputs in progress for one key (waiting here or in runs on their way
        # through the stages), a new request is refused at once (RESOURCE_EXHAUSTED with RetryInfo) instead of
        # waiting here only to be refused by a full model queue. Kept at or under the model's max_queue_size, the
        # model's queue never overflows with what this gateway sent.
        self.max_queued = max_queued
        self._admitted: Counter[Key] = Counter()
        # Per key and level, a moving average of how long answered requests took from submit to answer (seconds):
        # per level, as a high-priority caller's express run answers in a fraction of a low-priority one's time.
        self._latency: dict[tuple[Key, Priority], float] = {}
        # Per key, the refused callers told to come back later: a heap of (when, inputs), and their inputs in all.
        self._promised: dict[Key, list[tuple[float, int]]] = {}
        self._promised_inputs: Counter[Key] = Counter()
        self.retry_jitter = retry_jitter
        self._rng = rng or random.Random()
        self._queues: dict[Key, WeightedQueue[_Waiter[Result]]] = {}
        self._inflight: Counter[Key] = Counter()
        # Per key, express runs in flight: high-priority callers only, started past max_inflight (at most as many
        # again, so that high-priority callers wait neither for low-priority runs nor, many at once, for each other).
        self._express: Counter[Key] = Counter()
        # Per key, a smaller merge size learned from a stage that refused a merged run as too large (the inference
        # stage's per-request limit is its model's queue size, which the gateway is not told), and until when it
        # holds: a model whose limit grows (a new version, a changed tandem.json) gets large runs again.
        self._caps: dict[Key, tuple[int, float]] = {}
        self.cap_ttl_s = cap_ttl_s
        self._tasks: set[asyncio.Task[None]] = set()
        self.runs = 0

    async def submit(
        self, key: Key, inputs: Sequence[str], deadline: float, priority: Priority | None = None
    ) -> Result:
        """The caller's slice of a merged run; `priority` defaults to the call's (current_priority)."""
        level = current_priority.get() if priority is None else priority
        admitted = self._admitted[key]
        if self.max_queued is not None and not admits(level, admitted, len(inputs), self.max_queued):
            raise errors.resource_exhausted(
                f"too many texts in progress for this model at the gateway: {admitted}, limit {self.max_queued}"
                f" ({level.label} priority)",
                retry_after_s=self._pushback(key, len(inputs), level),
                priority=level.label,
            )
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        # Released when the caller is answered, fails or gives up, whether it was still waiting or in a run.
        self._admitted[key] += len(inputs)
        future.add_done_callback(lambda _: self._release(key, len(inputs)))
        waiter = _Waiter(inputs, future, deadline, trace.get_current_span(), timing.current(), time.monotonic(), level)
        self._queues.setdefault(key, WeightedQueue()).push(waiter, level, len(inputs))
        self._start_runs(key)
        # A cancelled caller cancels its future: its inputs are dropped if its run has not started yet.
        return await future

    def _cap(self, key: Key) -> int:
        learned = self._caps.get(key)
        if learned is None:
            return self.max_inputs
        cap, until = learned
        if time.monotonic() >= until:
            del self._caps[key]
            return self.max_inputs
        return cap

    def _delay(self, key: Key, waiting: int, level: Priority) -> float:
        base = max(self._latency.get((key, level), MIN_RETRY_S), MIN_RETRY_S)
        places = self.max_queued * ADMISSION_SHARES[level] if self.max_queued else 0
        stretched = base * (1 + waiting / places) if places else base
        if stretched <= MAX_RETRY_S:
            # Spread at random around the caller's place, so that no caller's retries lock into step with the runs
            # that free places: without it, in six of seven runs of scripts/priority_bench.py (256 low-priority
            # callers at nice 0 beside 4 high-priority ones), 1-4 of the crowd were refused at every try (38-46) of a
            # 40 s phase; with it, one caller in one of five runs (docs/benchmarks/2026-12-05/reserve/jitter/).
            spread = 1 + self.retry_jitter * self._rng.uniform(-1.0, 1.0)
            return min(max(stretched * spread, MIN_RETRY_S), MAX_RETRY_S)
        # Past the cap every caller would get the same delay and come back together: spread them over what is left.
        return self._rng.uniform(min(base, MAX_RETRY_S), MAX_RETRY_S)

    def _waiting(self, key: Key, now: float) -> int:
        """Inputs of refused callers whose suggested retry time is still ahead (forgetting those that passed)."""
        promised = self._promised.get(key)
        while promised and promised[0][0] <= now:
            _, count = heapq.heappop(promised)
            self._promised_inputs[key] -= count
        if not promised:
            self._promised.pop(key, None)
            self._promised_inputs.pop(key, None)
            return 0
        return self._promised_inputs[key]

    def _pushback(self, key: Key, inputs: int, level: Priority) -> float:
        """The RetryInfo delay for a caller refused now, and a note that it was told so.

        About when a place will be free for it: the time admitted requests take to be answered now, stretched by the
        callers already told to come back (their inputs ahead of this one, in units of the places the caller's level may
        fill, --coalesce-max-queued times its admission share, answered per that time). Both per level: a low-priority
        caller waits for low-priority answers, not for an average pulled down by fast express runs. A fixed delay made
        every refused caller come back after one answer time, so a crowd several times the limit kept the gateway
        refusing several callers for each one it admitted (at concurrency 256 and a limit of 64, 3.6 refusals per
        answer); spaced out by their place, refused callers come back about as fast as places free up, and the gateway's
        cycles go to answers and fast refusals. Within [MIN_RETRY_S, MAX_RETRY_S]; once the stretch passes the top, at
        random between the answer time and the top. A caller that ignores RetryInfo is refused again, as before, and its
        early calls count as callers waiting, so a crowd of such callers pushes the delays of well-behaved ones toward
        MAX_RETRY_S (per-key rate limits are what stop it).
        """
        now = time.monotonic()
        delay = self._delay(key, self._waiting(key, now), level)
        heapq.heappush(self._promised.setdefault(key, []), (now + delay, inputs))
        self._promised_inputs[key] += inputs
        return delay

    def _observe(self, key: Key, waiters: Sequence[_Waiter[Result]]) -> None:
        now = time.monotonic()
        sample = sum(now - w.submitted for w in waiters) / len(waiters)
        slot = (key, waiters[0].priority)  # a run holds callers of one level (see _take)
        previous = self._latency.get(slot)
        self._latency[slot] = sample if previous is None else previous + 0.2 * (sample - previous)

    def _release(self, key: Key, count: int) -> None:
        self._admitted[key] -= count
        if self._admitted[key] <= 0:
            del self._admitted[key]

    def _take(self, key: Key, level: Priority | None = None) -> list[_Waiter[Result]]:
        """Waiters for the next run, up to the merge cap: of `level`, or of the level whose turn it is (weighted).
        One level a run: a high-priority caller merged with low ones would wait for their texts too, and they would
        ride through the stages at its level."""
        queue = self._queues.get(key)
        if queue is None:
            return []
        level = queue.next_level() if level is None else level
        taken: list[_Waiter[Result]] = []
        count = 0
        cap = self._cap(key)
        while (head := queue.peek(level)) is not None and (not taken or count + len(head.inputs) <= cap):
            waiter, _ = queue.pop(level)
            if waiter.future.done():
                continue
            taken.append(waiter)
            count += len(waiter.inputs)
        if not queue:
            self._queues.pop(key, None)
        return taken

    def _start_runs(self, key: Key) -> None:
        while self._inflight[key] < self.max_inflight:
            batch = self._take(key)
            if not batch:
                return
            self._launch(key, batch, express=False)
        while (
            self._express[key] < self.max_inflight and (queue := self._queues.get(key)) and queue.waiting(Priority.HIGH)
        ):
            batch = self._take(key, Priority.HIGH)
            if not batch:
                break
            self._launch(key, batch, express=True)

    def _launch(self, key: Key, batch: list[_Waiter[Result]], express: bool) -> None:
        # Express runs count apart: they must not hold back the runs of the other levels.
        (self._express if express else self._inflight)[key] += 1
        task = asyncio.create_task(self._run(key, batch, express))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        def left(future: asyncio.Future[Result]) -> None:
            # Every caller of the run gave up: nobody waits for its answer, so its stage calls are cancelled too (the
            # inference stage drops their rows), and its slot goes to the next run.
            if future.cancelled() and not task.done() and all(w.future.cancelled() for w in batch):
                task.cancel()

        for waiter in batch:
            waiter.future.add_done_callback(left)

    async def _run(self, key: Key, batch: list[_Waiter[Result]], express: bool = False) -> None:
        try:
            live = [w for w in batch if not w.future.done()]
            if not live:
                return
            inputs = [text for w in live for text in w.inputs]
            self.runs += 1
            # The stages see the run's level (set in this task's own context: no caller's is touched).
            current_priority.set(live[0].priority)
            run_record = timing.begin()  # this task's own context: the callers' records are untouched until the end
            try:
                with self._run_span(live, len(inputs)):
                    result = await self._run_fn(key, inputs, max(w.deadline for w in live))
                parts = self._split(result, [len(w.inputs) for w in live])
            except Exception as exc:  # every caller of the run sees the run's error
                if len(live) > 1 and errors.reason_of(exc) == Reason.TOO_MANY_INPUTS:
                    # Too large because it was merged, not because of any caller: no caller may see that error.
                    # Merge at most half as much from now on and run these callers again, first in line.
                    cap = max(1, len(inputs) // 2)
                    self._caps[key] = (cap, time.monotonic() + self.cap_ttl_s)
                    log.info("a merged run of %d inputs was too large; merging at most %d now", len(inputs), cap)
                    queue = self._queues.setdefault(key, WeightedQueue())
                    for w in reversed(live):
                        queue.push_front(w, w.priority, len(w.inputs))
                    return
                _share(run_record, live)
                for w in live:
                    if not w.future.done():
                        w.future.set_exception(exc)
                return
            _share(run_record, live)
            self._observe(key, live)
            for w, part in zip(live, parts, strict=True):
                if not w.future.done():
                    w.future.set_result(part)
        finally:
            counter = self._express if express else self._inflight
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]
            self._start_runs(key)

    @staticmethod
    def _run_span(live: list[_Waiter[Result]], inputs: int) -> contextlib.AbstractContextManager[trace.Span]:
        """The merged run belongs to its first caller's trace; every other caller's span links to it and back.

        The run's task was started from whichever call freed its slot, so its parent is set here explicitly.
        """
        if not tracing.enabled():
            return contextlib.nullcontext(trace.INVALID_SPAN)
        others = [w.span for w in live[1:]]
        span = tracing.tracer().start_span(
            "coalesced_run",
            context=trace.set_span_in_context(live[0].span),
            links=[trace.Link(other.get_span_context()) for other in others],
            attributes={"tandem.callers": len(live), tracing.INPUTS_ATTRIBUTE: inputs},
        )
        for other in others:
            other.add_link(span.get_span_context(), {"tandem.link": "coalesced_run"})
        return trace.use_span(span, end_on_exit=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _share(run: timing.CallRecord, waiters: Sequence[_Waiter[Result]]) -> None:
    """A merged run's stage timings apply to every caller in it."""
    for w in waiters:
        if w.record is not None:
            w.record.merge(run)
