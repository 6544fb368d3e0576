"""The Batcher: merges concurrent requests for one model version into padded model calls on worker threads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from services.common import errors, timing, tracing
from services.common.pooling import check_pooling, pool_padded
from services.common.priority import DEFAULT, WEIGHTS, Priority, WeightedQueue, admits
from services.common.repository import ModelConfig, Task
from services.inference.backends.base import Backend, FloatArray, IntArray, lower_priority, token_level
from services.inference.batching.planner import DEFAULT_CALL_COST_TOKENS, cut
from services.inference.batching.requests import Request

log = logging.getLogger(__name__)


class BatchObserver(Protocol):
    """Where a batcher reports how long requests queued and each model call (the stage's metrics)."""

    def queued(self, seconds: float) -> None: ...

    def batch(self, rows: int, padded_tokens: int, seconds: float) -> None: ...


class _Unobserved:
    def queued(self, seconds: float) -> None:
        return None

    def batch(self, rows: int, padded_tokens: int, seconds: float) -> None:
        return None


class Batcher:
    """Merges concurrent requests for one model version into padded model calls, run in one worker thread.

    Each round takes the queued requests (waiting up to max_queue_delay_ms for more while under a full call for every
    instance, max_batch_size x instances sequences), sorts their sequences by length so that padding stays small, cuts
    them into calls bounded by max_batch_size sequences and max_batch_tokens padded tokens, and routes the output rows
    back to their callers.

    Requests are taken in priority order, weighted so that lower levels are never starved (services/common/priority.py);
    a free instance that finds higher-priority work queued than the next call already cut cuts that work and lets it go
    first (each cut call lets at most MAX_OVERTAKEN later ones go first): a high-priority request waits for the calls
    running, not for a round of low-priority ones; and while high-priority work comes and keeps the model busy, one
    instance (high_priority_instances) runs only its calls, so it seldom waits for a running call either.
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
        inline_ms: float = 0.0,
    ) -> None:
        self.backend = backend
        self.observer: BatchObserver = observer or _Unobserved()
        self.config = config
        self.name = name
        self.pad_token_id = pad_token_id
        self.token_level = token_level(config.task)
        # How callers that ask for it get their sequences pooled (embedding models only; see submit).
        self.pooling = check_pooling(pooling) if pooling is not None and config.task is Task.EMBEDDING else None
        self._queue: WeightedQueue[Request] = WeightedQueue()
        self._wakeup = asyncio.Event()
        self._pending = 0
        # Calls cut from the rounds taken so far, waiting for a free instance; and what each instance is running
        # now (both answered with UNAVAILABLE if the batcher closes meanwhile).
        self._calls: deque[_Call] = deque()
        self._running: dict[int, list[tuple[Request, int]]] = {}
        # Padding worth accepting to save a call (planner.cut): given, from tandem.json, or a middle-of-the-road guess.
        if call_cost_tokens is None:
            call_cost_tokens = config.batch_call_cost_tokens
        self.call_cost_tokens = DEFAULT_CALL_COST_TOKENS if call_cost_tokens is None else call_cost_tokens
        # While high-priority work comes (until _high_until), other calls are cut short, so that a high-priority
        # request waits for little of a call already running: at most SHARED_CALL_COSTS times the model's cost per
        # call in padded tokens, which costs them at most about 1/SHARED_CALL_COSTS of their throughput. On a CPU
        # (all-MiniLM-L6-v2 on one thread: a call costs about 19 tokens) that is calls of about 10 short texts
        # instead of max_batch_size; on a GPU (a call costs thousands) it changes nothing.
        self._high_until = float("-inf")
        shared_tokens = max(1, min(config.max_batch_tokens, int(SHARED_CALL_COSTS * self.call_cost_tokens)))
        self._shared_config = config.model_copy(update={"max_batch_tokens": shared_tokens})
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        # One thread per instance: up to `instances` model calls run at once (each on the backend's share of the
        # cores), and the event loop never waits on one.
        self.instances = instances or config.instances or 1
        # While high-priority work comes and keeps the model busy for at least RESERVE_HIGH_LOAD of an instance's
        # time, the first `_reserved` instances run only its calls, so that a high-priority request starts at once
        # instead of waiting for a call of lower rows to end (what cutting them short above leaves is still a call's
        # wait). Paired runs of scripts/priority_bench.py (all-MiniLM-L6-v2, 2 instances, 256 low-priority callers of
        # one short text beside 4 closed-loop high-priority ones): the high-priority p50 went from 1.99-2.05x its
        # unloaded p50 to 1.55-1.71x, its wait in the queue from 6.1-6.7 to 3.3-3.6 ms, for 262-265 low-priority
        # answers/s instead of 300-345; with the bound as well, 1.52-1.59x. The bound is for a trickle: kept for two
        # high-priority requests a second, an idle instance cost 32 normal callers of one text 31% of their texts/s
        # and 4 callers of 32 texts 42%. Never every instance: one is always left for the rest.
        self._reserved = min(config.high_priority_instances, self.instances - 1)
        # Seconds of model time high-priority calls took per second lately (a moving sum decaying over
        # HIGH_PRIORITY_MEMORY_S), as of _high_load_at.
        self._high_load = 0.0
        self._high_load_at = time.monotonic()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.instances, thread_name_prefix=f"infer-{name}", initializer=lower_priority, initargs=(nice,)
        )
        # Calls of low-priority rows only run on threads LOW_PRIORITY_NICE steps less urgent still, so that the
        # operating system, not just the batcher's queue, puts a higher-priority call first when both run at once
        # (threads never become more urgent again without privileges, hence threads of their own).
        self._low_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.instances,
            thread_name_prefix=f"infer-{name}-low",
            initializer=lower_priority,
            initargs=(nice + LOW_PRIORITY_NICE,),
        )
        self._alone_running = False
        # A lone call expected to take at most inline_s runs on the event loop's own thread: handing it to a worker
        # thread and its result back costs two thread wake-ups, a sizeable share of a short call (paired `tandem bench`
        # runs on 2 cores, in-process shape, all-MiniLM-L6-v2: one caller of one short text p50 4.83 -> 4.73 ms,
        # 4 callers 240 -> 249 texts/s, 32 callers alike within the noise). Only a lone call: nothing else is queued
        # or running, so the loop has nothing to do meanwhile but take new requests, which wait for it; hence the
        # bound on its time, not its tokens: a BERT-base-sized model's 15 ms call inlined cost 4 callers 6-13% of
        # their texts/s. Waiting for the stage to be idle for 1 ms before inlining kept the one-caller gain and lost
        # the four-caller one.
        self.inline_s = inline_ms / 1000
        # Seconds per padded token of the lone calls so far (a moving average), counting the call's own cost in
        # tokens (call_cost_tokens) as the planner does; None until a lone call has run (it runs on a worker).
        self._lone_s_per_token: float | None = None

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
        priority: Priority = DEFAULT,
    ) -> FloatArray:
        """The output rows of one ragged batch: [total_tokens, width] or [n, width], in the caller's order.

        With pool (and a pooling, i.e. an embedding model), each sequence's token rows are pooled in the worker
        thread right after its model call, and the caller gets [n, width]: see pools(). A lower `priority` may fill
        less of max_queue_size (priority.admits), so the last places go to higher levels."""
        if self._closed:
            raise errors.unavailable(f"model {self.name} is shutting down", model=self.name)
        count = len(cu_seqlens) - 1
        if not admits(priority, self._pending, count, self.config.max_queue_size):
            raise errors.resource_exhausted(
                f"model {self.name} is busy: {self._pending} sequences queued, limit {self.config.max_queue_size}"
                f" ({priority.label} priority)",
                model=self.name,
                priority=priority.label,
            )
        if deadline is not None and deadline <= time.monotonic():
            raise errors.deadline_exceeded(f"deadline passed before {self.name} could run", model=self.name)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[FloatArray] = loop.create_future()
        cu = cu_seqlens.astype(np.int64)
        request = Request(
            input_ids,
            token_type_ids,
            cu[:-1],
            np.diff(cu),
            deadline,
            future,
            count,
            queued_at=time.perf_counter(),
            pool=self.pools(pool),
            priority=priority,
        )
        self._pending += count
        future.add_done_callback(lambda _: self._release(count))
        if tracing.enabled():  # nothing per request on the hot path while tracing is off
            request.caller = trace.get_current_span()
            request.queued = tracing.tracer().start_span("queue", attributes={"tandem.model": self.name})
            future.add_done_callback(lambda _: tracing.end(request.queued))
        self._queue.push(request, priority, count)
        if priority == Priority.HIGH:
            self._high_until = time.monotonic() + HIGH_PRIORITY_MEMORY_S
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
        call that starts meanwhile does not wait for it; the two share the cores until the lone one ends. An instance
        kept for high-priority work (_reserving) runs only high-priority calls while that lasts.
        """
        while True:
            if not self._calls or self._outranked():
                while not self._queue and not self._calls:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                if self._calls and not self._outranked():  # another instance cut a round while this one waited
                    continue
                await self._cut_round()
                continue
            if self._reserving(worker):
                found = self._pop_high()
                if found is None:
                    if self._queue.best() == Priority.HIGH:  # queued, not cut yet (the calls ahead do not let it pass)
                        await self._cut_round()
                    else:
                        await self._idle_reserved()
                    continue
                cut_call = found
            else:
                cut_call = self._calls.popleft()
            call = cut_call.items
            alone = self.backend.runs_alone and not self._alone_running and self._may_run_alone(cut_call)
            self._running[worker] = call
            try:
                await self._run_call(call, alone, cut_call.priority)
            except Exception:
                log.exception("model call of %s failed", self.name)
                self._fail([r for r, _ in call], errors.internal())
            finally:
                self._running.pop(worker, None)

    async def _cut_round(self) -> None:
        """Takes a round from the queue and cuts it into calls; wakes the other instances if work is left."""
        taken = await self._take()
        try:
            self._plan(taken)
        except Exception:
            log.exception("batcher of %s failed to plan a round", self.name)
            self._fail(taken, errors.internal())
        if self._calls or self._queue:  # more work than this instance can start now: wake the others
            self._wakeup.set()

    def _reserving(self, worker: int) -> bool:
        """Whether this instance is kept for high-priority calls now (see __init__)."""
        return worker < self._reserved and time.monotonic() < self._reserved_until()

    def _reserved_until(self) -> float:
        """When keeping instances for high-priority calls lapses: HIGH_PRIORITY_MEMORY_S after the last high-priority
        request, or sooner, when their recent model time decays under RESERVE_HIGH_LOAD."""
        if RESERVE_HIGH_LOAD <= 0:
            return self._high_until
        if self._high_load <= RESERVE_HIGH_LOAD:
            return float("-inf")
        decayed = self._high_load_at + HIGH_PRIORITY_MEMORY_S * math.log(self._high_load / RESERVE_HIGH_LOAD)
        return min(self._high_until, decayed)

    def _decayed_high_load(self, now: float) -> float:
        return self._high_load * math.exp((self._high_load_at - now) / HIGH_PRIORITY_MEMORY_S)

    def _count_high(self, seconds: float) -> None:
        """Adds a high-priority call's model time to the recent high-priority load."""
        now = time.monotonic()
        self._high_load = self._decayed_high_load(now) + seconds / HIGH_PRIORITY_MEMORY_S
        self._high_load_at = now

    def _pop_high(self) -> _Call | None:
        """The first high-priority call cut, taken off the list; None when there is none."""
        for index, call in enumerate(self._calls):
            if call.priority == Priority.HIGH:
                del self._calls[index]
                return call
        return None

    async def _idle_reserved(self) -> None:
        """A kept instance with no high-priority call to run: waits for new work, or for the reservation to lapse
        (_reserved_until)."""
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, self._reserved_until() - time.monotonic())):
                await self._wakeup.wait()

    def _may_run_alone(self, call: _Call) -> bool:
        """A call runs on all of the stage's threads when it has the model to itself."""
        return not self._calls and not self._queue and not self._running

    def _outranked(self) -> bool:
        """Whether queued work has a higher priority than every call already cut (the first is the highest)."""
        queued = self._queue.best()
        return queued is not None and bool(self._calls) and self._calls[0].yields_to(queued)

    @staticmethod
    def _fail(requests: Iterable[Request], error: Exception) -> None:
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)

    async def _take(self) -> list[Request]:
        """Whole requests from the queue, lingering for more while under a full call for every instance.

        Not one call's worth: requests of max_batch_size texts would each make a round of their own, and a round's
        rows are only sorted among themselves. Cut together, the short rows of two such requests share calls and so do
        the long ones (all-MiniLM-L6-v2, 4 callers of 32 short texts, 2 instances: 0.88 of the model's length-sorted
        speed alone with rounds of one request, 0.93-0.94 with two, 0.98 with four, scripts/batch_composition.py;
        `tandem bench` 783 -> 833 and 757 -> 830 texts/s)."""
        taken: list[Request] = []
        count = 0
        limit = self.config.max_batch_size * self.instances
        linger_until = time.monotonic() + self.config.max_queue_delay_ms / 1000
        while True:
            while self._queue and (count < limit or not taken):
                request, _ = self._queue.pop()
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

    def _wanted(self, request: Request, now: float) -> bool:
        """False for requests already answered or cancelled, and for those past their deadline (failed here)."""
        if request.future.done():
            return False
        if request.deadline is not None and request.deadline <= now:
            request.future.set_exception(
                errors.deadline_exceeded(f"deadline passed while queued for {self.name}", model=self.name)
            )
            return False
        return True

    def _plan(self, taken: list[Request]) -> None:
        """Cuts a round's live sequences into calls, queued for whichever instance is free first."""
        for request in taken:
            tracing.end(request.queued)
        live = [r for r in taken if self._wanted(r, time.monotonic())]
        if not live:
            return
        # While high-priority work comes, its rows get calls of their own (none waits for lower rows cut into the
        # same call), and the other rows calls cut short (see __init__).
        high = [r for r in live if r.priority == Priority.HIGH]
        rest = [r for r in live if r.priority != Priority.HIGH]
        shared = time.monotonic() < self._high_until
        for requests, config in ((high, self.config), (rest, self._shared_config if shared else self.config)):
            if not requests:
                continue
            items = [(r, i) for r in requests for i in range(r.count)]
            lengths = np.concatenate([r.lengths for r in requests])
            for call in cut(lengths, config, self.call_cost_tokens):
                self._queue_call(_Call([items[j] for j in call]))

    def _queue_call(self, call: _Call) -> None:
        """Behind the calls of its level or higher, ahead of lower ones that may still be overtaken."""
        position = len(self._calls)
        while position and self._calls[position - 1].yields_to(call.priority):
            position -= 1
        for passed in itertools.islice(self._calls, position, None):
            passed.overtaken += 1
        self._calls.insert(position, call)

    async def _run_call(
        self, call: list[tuple[Request, int]], alone: bool = False, priority: Priority = DEFAULT
    ) -> None:
        now = time.monotonic()
        chosen = [item for item in call if self._wanted(item[0], now)]
        if not chosen:
            return
        riders = list(dict.fromkeys(r for r, _ in chosen))
        padded = len(chosen) * max(int(r.lengths[i]) for r, i in chosen)
        started = time.perf_counter()
        for request in riders:
            if request.started_at is None:
                request.started_at = started
                self.observer.queued(started - request.queued_at)
        low = priority == Priority.LOW
        executor = self._low_executor if low else self._executor
        if alone:
            self._alone_running = True
        try:
            with self._model_run_span(chosen, riders, alone):
                if alone and not low and self._inline(padded):
                    out, pooled = self._execute(chosen, alone)
                else:
                    out, pooled = await asyncio.get_running_loop().run_in_executor(
                        executor, self._execute, chosen, alone
                    )
        finally:
            if alone:
                self._alone_running = False
        seconds = time.perf_counter() - started
        for request in riders:
            request.compute_s += seconds
        if priority == Priority.HIGH:
            self._count_high(seconds)
        if alone:
            sample = seconds / (padded + self.call_cost_tokens)
            last = self._lone_s_per_token
            self._lone_s_per_token = sample if last is None else last + 0.2 * (sample - last)
        self.observer.batch(len(chosen), padded, seconds)
        self._scatter(chosen, out, pooled)
        for request, _ in chosen:
            request.remaining -= 1
            if request.remaining == 0 and not request.future.done():
                assert request.output is not None
                request.future.set_result(request.output)

    def _inline(self, padded_tokens: int) -> bool:
        """Whether a lone call of this many padded tokens is expected to take at most inline_s (see __init__)."""
        per_token = self._lone_s_per_token
        if self.inline_s <= 0 or per_token is None:
            return False
        return per_token * (padded_tokens + self.call_cost_tokens) <= self.inline_s

    def _scatter(self, chosen: list[tuple[Request, int]], out: FloatArray, pooled: FloatArray | None) -> None:
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
        self, chosen: list[tuple[Request, int]], callers: list[Request], alone: bool
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

    def _execute(self, chosen: list[tuple[Request, int]], alone: bool = False) -> tuple[FloatArray, FloatArray | None]:
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
        calls = [*self._running.values(), *(call.items for call in self._calls)]
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
        await asyncio.to_thread(self._low_executor.shutdown, wait=True)
        self.backend.close()


# How many times the model's per-call cost a call without high-priority rows may carry while high-priority work comes,
# and for how long after the last high-priority request that lasts (see Batcher.__init__).
SHARED_CALL_COSTS = 8
# The share of one instance's time high-priority calls must have taken lately for instances to be kept for them.
RESERVE_HIGH_LOAD = 0.1
# How much less urgent (Linux niceness, on top of the stage's compute_nice) the threads of low-priority calls are.
LOW_PRIORITY_NICE = 9
HIGH_PRIORITY_MEMORY_S = 1.0
# How many later calls of higher levels one cut call lets go first before it is next whatever comes: the ratio of the
# highest weight to the lowest, so cut calls are no more starved than queued requests are (see priority.WEIGHTS).
MAX_OVERTAKEN = round(max(WEIGHTS.values()) / min(WEIGHTS.values()))


@dataclass(eq=False)
class _Call:
    """One cut model call waiting for an instance: its rows, its level (its highest request's), and how many calls
    cut later went ahead of it."""

    items: list[tuple[Request, int]]
    priority: Priority = field(init=False)
    overtaken: int = 0

    def __post_init__(self) -> None:
        self.priority = min(r.priority for r, _ in self.items)

    def yields_to(self, level: Priority) -> bool:
        """Whether a call of `level` cut now goes ahead of this one."""
        return level < self.priority and self.overtaken < MAX_OVERTAKEN
