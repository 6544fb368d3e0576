"""The inference stage's Batcher on a fake numpy model: row routing, call limits, admission, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from services.common import errors
from services.common.errors import Reason
from services.common.pooling import pool_ragged
from services.common.priority import Priority
from services.common.repository import ModelConfig, Task
from services.inference.backends.base import Backend, FloatArray, IntArray
from services.inference.batching import batcher as batcher_module
from services.inference.batching.batcher import LOW_PRIORITY_NICE, MAX_OVERTAKEN, SHARED_CALL_COSTS, Batcher


class EchoBackend(Backend):
    """A model whose outputs reveal its inputs, so any misrouted row shows.

    Token-level: row (id, position, type). Sequence-level: (sum of ids, length, first id).
    A closed gate holds every call until the test opens it.
    """

    name = "echo"
    uses_token_type_ids = True

    def __init__(self, token_level: bool, runs_alone: bool = False) -> None:
        self.token_level = token_level
        self.runs_alone = runs_alone
        # Shapes of the calls that came through run_alone (a subset of calls).
        self.alone_calls: list[tuple[int, int]] = []
        self.calls: list[tuple[int, int]] = []
        self.seen: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        # Calls inside run() right now, and the most there ever were at once (instances > 1 run side by side).
        self._lock = threading.Lock()
        self.active = 0
        self.most_active = 0

    def run_alone(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        self.alone_calls.append(input_ids.shape)
        return self.run(input_ids, attention_mask, token_type_ids)

    def run(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            return self._run(input_ids, attention_mask, token_type_ids)
        finally:
            with self._lock:
                self.active -= 1

    def _run(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        self.started.set()
        assert self.gate.wait(30)
        self.calls.append(input_ids.shape)
        self.seen.extend(row[mask.astype(bool)].tolist() for row, mask in zip(input_ids, attention_mask, strict=True))
        assert token_type_ids is not None
        if self.token_level:
            positions = np.broadcast_to(np.arange(input_ids.shape[1]), input_ids.shape)
            return np.stack([input_ids, positions, token_type_ids], axis=-1).astype(np.float32)
        masked = input_ids * attention_mask
        return np.stack([masked.sum(1), attention_mask.sum(1), input_ids[:, 0]], axis=-1).astype(np.float32)


def expected(seqs: list[list[int]], token_level: bool) -> FloatArray:
    if token_level:
        rows = [(t, p, p % 2) for s in seqs for p, t in enumerate(s)]
        return np.array(rows, dtype=np.float32).reshape(-1, 3)
    return np.array([(sum(s), len(s), s[0]) for s in seqs], dtype=np.float32)


def ragged(seqs: list[list[int]]) -> tuple[IntArray, IntArray, np.ndarray]:
    ids = np.array([t for s in seqs for t in s], dtype=np.int64)
    types = np.array([p % 2 for s in seqs for p in range(len(s))], dtype=np.int64)
    cu = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum([len(s) for s in seqs], out=cu[1:])
    return ids, types, cu


def make(
    token_level: bool = True, runs_alone: bool = False, pooling: str | None = None, **limits: float
) -> tuple[Batcher, EchoBackend]:
    backend = EchoBackend(token_level, runs_alone)
    task = Task.EMBEDDING if token_level else Task.CLASSIFICATION
    config = ModelConfig(task=task, **limits)
    return Batcher(backend, config, "echo", pooling=pooling), backend


async def submit(
    batcher: Batcher, seqs: list[list[int]], deadline: float | None = None, pool: bool = False
) -> FloatArray:
    ids, types, cu = ragged(seqs)
    return await batcher.submit(ids, types, cu, deadline, pool=pool)


def pooled(seqs: list[list[int]], pooling: str) -> FloatArray:
    """What pooling each sequence's echoed token rows gives, by the postprocess stage's (ragged) pooling."""
    _, _, cu = ragged(seqs)
    return pool_ragged(expected(seqs, True), cu, pooling)


async def until(condition: Callable[[], object], what: str) -> None:
    """Polls `condition()` from the event loop; no timing is asserted, the bound only stops a hang."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("token_level", [True, False], ids=["token-level", "sequence-level"])
async def test_every_caller_gets_exactly_its_rows(token_level: bool) -> None:
    batcher, backend = make(token_level, max_batch_size=8, max_batch_tokens=96)
    rng = np.random.default_rng(7)
    requests = [
        [rng.integers(1, 1000, size=int(rng.integers(1, 20))).tolist() for _ in range(int(rng.integers(1, 6)))]
        for _ in range(80)
    ]
    backend.gate.clear()
    first = asyncio.ensure_future(submit(batcher, requests[0]))
    await until(backend.started.is_set, "the first call")
    rest = [asyncio.ensure_future(submit(batcher, r)) for r in requests[1:]]
    await until(lambda: batcher.pending == sum(len(r) for r in requests), "all requests queued")
    backend.gate.set()
    results = await asyncio.gather(first, *rest)
    for seqs, got in zip(requests, results, strict=True):
        np.testing.assert_array_equal(got, expected(seqs, token_level))
    # Limits hold for every call, and the 79 waiting callers shared calls.
    assert all((rows <= 8 and rows * width <= 96) or rows == 1 for rows, width in backend.calls)
    assert len(backend.calls) < len(requests) - 1
    assert batcher.pending == 0
    await batcher.close()


async def test_sequences_are_sorted_by_length_to_limit_padding() -> None:
    batcher, backend = make(max_batch_size=2, max_batch_tokens=1000)
    seqs = [[1] * 30, [2] * 2, [3] * 29, [4] * 3]
    np.testing.assert_array_equal(await submit(batcher, seqs), expected(seqs, True))
    assert sorted(backend.calls) == [(2, 3), (2, 30)]
    await batcher.close()


async def test_a_round_takes_a_full_call_for_every_instance_so_requests_are_cut_together() -> None:
    """Two queued requests of a short and a long row each: cut together, the short rows share a call and the long rows
    another; a round of one request at a time would pad each short row to its long one."""
    batcher, backend = make(max_batch_size=2, instances=2, batch_call_cost_tokens=1000)
    backend.gate.clear()
    busy = asyncio.ensure_future(submit(batcher, [[9]] * 4))  # one call on each instance
    await until(lambda: backend.active == 2, "both instances busy")
    first, second = [[1] * 2, [1] * 8], [[2] * 2, [2] * 8]
    calls = [asyncio.ensure_future(submit(batcher, seqs)) for seqs in (first, second)]
    await until(lambda: batcher.pending == 8, "both requests queued")
    backend.gate.set()
    await busy
    for seqs, call in zip((first, second), calls, strict=True):
        np.testing.assert_array_equal(await call, expected(seqs, True))
    assert sorted(backend.calls) == [(2, 1), (2, 1), (2, 2), (2, 8)]
    await batcher.close()


async def test_a_round_is_cut_where_padding_costs_more_than_a_call() -> None:
    seqs = [[1] * 3, [2] * 10, [3] * 3, [4] * 10, [5] * 3]
    # Padding three 3-token rows to 10 costs 21 tokens: more than a 2-token call, less than a 100-token one.
    for cost, calls in ((2.0, [(2, 10), (3, 3)]), (100.0, [(5, 10)])):
        batcher, backend = make(max_batch_size=8, batch_call_cost_tokens=cost)
        np.testing.assert_array_equal(await submit(batcher, seqs), expected(seqs, True))
        assert sorted(backend.calls) == calls
        await batcher.close()


@pytest.mark.parametrize("token_level", [True, False], ids=["token-level", "sequence-level"])
async def test_instances_run_calls_side_by_side_and_route_every_row(token_level: bool) -> None:
    batcher, backend = make(token_level, max_batch_size=4, max_batch_tokens=64, instances=2)
    rng = np.random.default_rng(11)
    requests = [
        [rng.integers(1, 1000, size=int(rng.integers(1, 16))).tolist() for _ in range(int(rng.integers(1, 7)))]
        for _ in range(60)
    ]
    backend.gate.clear()
    calls = [asyncio.ensure_future(submit(batcher, r)) for r in requests]
    await until(lambda: backend.active == 2, "two model calls running at once")
    backend.gate.set()
    results = await asyncio.gather(*calls)
    for seqs, got in zip(requests, results, strict=True):
        np.testing.assert_array_equal(got, expected(seqs, token_level))
    assert backend.most_active == 2
    assert all(rows <= 4 and rows * width <= 64 for rows, width in backend.calls)
    assert batcher.pending == 0
    await batcher.close()


async def test_the_calls_of_one_request_spread_over_the_instances() -> None:
    batcher, backend = make(instances=2, batch_call_cost_tokens=0)
    seqs = [[n] * n for n in range(1, 7)]  # six lengths, no padding worth a call: six calls
    await submit(batcher, [[9]])  # both instances started, and now idle
    backend.calls.clear()
    backend.gate.clear()
    call = asyncio.ensure_future(submit(batcher, seqs))
    await until(lambda: backend.active == 2, "both instances running calls of the one request")
    backend.gate.set()
    np.testing.assert_array_equal(await call, expected(seqs, True))
    assert sorted(backend.calls) == [(1, n) for n in range(1, 7)]
    await batcher.close()


async def test_a_call_with_the_model_to_itself_runs_alone_and_others_run_beside_it() -> None:
    batcher, backend = make(runs_alone=True, instances=2, batch_call_cost_tokens=0)
    lone = [[4, 5, 6]]
    np.testing.assert_array_equal(await submit(batcher, lone), expected(lone, True))
    assert backend.alone_calls == [(1, 3)]
    # A call that starts while the lone one runs does not wait for it, and runs on its instance's share.
    backend.calls.clear()
    backend.alone_calls.clear()
    backend.gate.clear()
    first = asyncio.ensure_future(submit(batcher, [[1, 2]]))
    await until(lambda: backend.active == 1, "the lone call running")
    second = asyncio.ensure_future(submit(batcher, [[3, 3, 3, 3]]))
    await until(lambda: backend.active == 2, "a second call beside the lone one")
    backend.gate.set()
    np.testing.assert_array_equal(await first, expected([[1, 2]], True))
    np.testing.assert_array_equal(await second, expected([[3, 3, 3, 3]], True))
    assert backend.alone_calls == [(1, 2)] and sorted(backend.calls) == [(1, 2), (1, 4)]
    # The calls of a round taken while more of it waits are not alone: the other instance takes the next at once.
    backend.calls.clear()
    backend.alone_calls.clear()
    backend.gate.clear()
    seqs = [[n] * n for n in range(1, 5)]
    call = asyncio.ensure_future(submit(batcher, seqs))
    await until(lambda: backend.active == 2, "two calls of the round running")
    assert backend.alone_calls == []
    backend.gate.set()
    np.testing.assert_array_equal(await call, expected(seqs, True))
    assert len(backend.calls) == 4
    await batcher.close()


class ThreadRecordingBackend(EchoBackend):
    """An EchoBackend that notes which thread ran each call, (lone?, shape, thread id), and takes `call_s` a call."""

    def __init__(self, call_s: float = 0.0) -> None:
        super().__init__(token_level=True, runs_alone=True)
        self.threads: list[tuple[bool, tuple[int, int], int]] = []
        self.call_s = call_s

    def run_alone(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        self.threads.append((True, input_ids.shape, threading.get_ident()))
        time.sleep(self.call_s)
        return self._run(input_ids, attention_mask, token_type_ids)

    def run(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        self.threads.append((False, input_ids.shape, threading.get_ident()))
        return super().run(input_ids, attention_mask, token_type_ids)


@pytest.mark.parametrize(
    ("inline_ms", "call_s", "on_loop"),
    [
        (60_000.0, 0.0, True),  # expected well within the bound: on the loop's thread once a lone call was timed
        (20.0, 0.06, False),  # each call takes 60 ms, three times the bound: always on a worker thread
        (0.0, 0.0, False),  # off
    ],
    ids=["within", "too-slow", "off"],
)
async def test_a_lone_call_runs_on_the_event_loop_thread_when_expected_within_the_bound(
    inline_ms: float, call_s: float, on_loop: bool
) -> None:
    backend = ThreadRecordingBackend(call_s)
    config = ModelConfig(task=Task.EMBEDDING, instances=2, batch_call_cost_tokens=0)
    batcher = Batcher(backend, config, "echo", inline_ms=inline_ms)
    loop_thread = threading.get_ident()
    for seqs in ([[4, 5, 6]], [[7] * 12], [[1, 2]]):
        np.testing.assert_array_equal(await submit(batcher, seqs), expected(seqs, True))
    # Two sequences of 3 and 2 tokens in one request: cut into two calls that run side by side, never alone.
    pair = [[1, 1, 1], [2, 2]]
    np.testing.assert_array_equal(await submit(batcher, pair), expected(pair, True))
    lone = [(shape, thread == loop_thread) for alone, shape, thread in backend.threads if alone]
    # The first lone call has no timing to go by, so it runs on a worker thread and is timed.
    assert lone == [((1, 3), False), ((1, 12), on_loop), ((1, 2), on_loop)]
    assert all(thread != loop_thread for alone, _, thread in backend.threads if not alone)
    assert sorted(shape for alone, shape, _ in backend.threads if not alone) == [(1, 2), (1, 3)]
    await batcher.close()


async def test_a_backend_without_a_lone_path_runs_every_call_the_same_way() -> None:
    batcher, backend = make(runs_alone=False, instances=2)
    np.testing.assert_array_equal(await submit(batcher, [[1, 2]]), expected([[1, 2]], True))
    assert backend.calls == [(1, 2)] and backend.alone_calls == []
    await batcher.close()


async def test_close_fails_the_calls_running_on_every_instance() -> None:
    batcher, backend = make(max_batch_size=1, instances=2)
    backend.gate.clear()
    running = [asyncio.ensure_future(submit(batcher, [[n, n]])) for n in (1, 2, 3)]
    await until(lambda: backend.active == 2, "both instances busy")
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0)
    backend.gate.set()
    await closing
    for future in running:
        with pytest.raises(errors.TandemError) as caught:
            await future
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in caught.value.message


async def test_a_sequence_over_the_token_budget_runs_alone() -> None:
    batcher, backend = make(max_batch_size=8, max_batch_tokens=10)
    seqs = [[5] * 3, [6] * 12, [7] * 3, [8] * 4]
    np.testing.assert_array_equal(await submit(batcher, seqs), expected(seqs, True))
    assert backend.calls == [(2, 3), (1, 4), (1, 12)]
    await batcher.close()


async def test_a_full_queue_fails_fast_with_retry_info() -> None:
    batcher, backend = make(max_queue_size=4)
    backend.gate.clear()
    running = asyncio.ensure_future(submit(batcher, [[1, 2], [3]]))
    await until(backend.started.is_set, "the first call")
    waiting = asyncio.ensure_future(submit(batcher, [[4], [5]]))
    await until(lambda: batcher.pending == 4, "the second request queued")
    with pytest.raises(errors.TandemError) as caught:
        await submit(batcher, [[6]])
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.reason == Reason.QUEUE_FULL
    assert caught.value.retry_after_s is not None
    backend.gate.set()
    await asyncio.gather(running, waiting)
    assert [6] not in backend.seen
    await batcher.close()


async def test_an_expired_request_never_reaches_the_model() -> None:
    batcher, backend = make()
    with pytest.raises(errors.TandemError) as caught:
        await submit(batcher, [[9, 9]], deadline=time.monotonic() - 1)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert backend.calls == []

    backend.gate.clear()
    running = asyncio.ensure_future(submit(batcher, [[1, 2, 3]]))
    await until(backend.started.is_set, "the first call")
    deadline = time.monotonic() + 0.05
    late = asyncio.ensure_future(submit(batcher, [[77, 77, 77, 77]], deadline=deadline))
    await until(lambda: time.monotonic() > deadline, "the deadline to pass")
    backend.gate.set()
    await running
    with pytest.raises(errors.TandemError) as caught:
        await late
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [77, 77, 77, 77] not in backend.seen
    await batcher.close()


async def test_a_cancelled_caller_is_skipped() -> None:
    batcher, backend = make()
    backend.gate.clear()
    running = asyncio.ensure_future(submit(batcher, [[1, 2, 3]]))
    await until(backend.started.is_set, "the first call")
    cancelled = asyncio.ensure_future(submit(batcher, [[55, 55]]))
    kept = asyncio.ensure_future(submit(batcher, [[66, 66]]))
    await until(lambda: batcher.pending == 3, "both requests queued")
    cancelled.cancel()
    await until(lambda: batcher.pending == 2, "the cancellation to free its slot")
    backend.gate.set()
    await running
    np.testing.assert_array_equal(await kept, expected([[66, 66]], True))
    assert [55, 55] not in backend.seen
    await batcher.close()


async def test_a_failing_model_fails_its_callers_with_internal() -> None:
    batcher, backend = make()

    def broken(input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        raise RuntimeError("boom")

    backend.run = broken  # type: ignore[method-assign]
    with pytest.raises(errors.TandemError) as caught:
        await submit(batcher, [[1, 2]])
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert "boom" not in caught.value.message
    await batcher.close()


async def test_close_fails_queued_requests() -> None:
    batcher, backend = make()
    backend.gate.clear()
    running = asyncio.ensure_future(submit(batcher, [[1, 2, 3]]))
    await until(backend.started.is_set, "the first call")
    queued = asyncio.ensure_future(submit(batcher, [[4, 5]]))
    await until(lambda: batcher.pending == 2, "the second request queued")
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0)
    backend.gate.set()
    await closing
    for future in (running, queued):
        with pytest.raises(errors.TandemError) as caught:
            await future
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(errors.TandemError):
        await submit(batcher, [[1]])


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread niceness is a Linux facility")
async def test_model_calls_run_on_niced_threads_and_the_event_loop_does_not() -> None:
    backend = EchoBackend(token_level=True)
    niceness: list[int] = []
    plain_run = backend.run

    def run(input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        niceness.append(os.getpriority(os.PRIO_PROCESS, 0))  # 0: the calling thread, on Linux
        return plain_run(input_ids, attention_mask, token_type_ids)

    backend.run = run  # type: ignore[method-assign]
    batcher = Batcher(backend, ModelConfig(task=Task.EMBEDDING), "echo", nice=5)
    loop_niceness = os.getpriority(os.PRIO_PROCESS, 0)
    np.testing.assert_array_equal(await submit(batcher, [[1, 2, 3]]), expected([[1, 2, 3]], True))
    assert niceness == [min(loop_niceness + 5, 19)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == loop_niceness
    await batcher.close()


@pytest.mark.parametrize("token_level", [True, False], ids=["token-level", "sequence-level"])
async def test_calls_of_one_request_finishing_together_on_several_instances_keep_every_row(token_level: bool) -> None:
    """One request of four lengths is four calls (no padding accepted), on four instances, returning at the same
    moment: every row must land in the caller's output, whichever call finishes first."""
    import sys

    batcher, backend = make(token_level, instances=4, batch_call_cost_tokens=0)
    finish = threading.Barrier(4, timeout=10)
    plain_run = backend.run

    def run(input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        out = plain_run(input_ids, attention_mask, token_type_ids)
        finish.wait()  # the four calls return together
        return out

    backend.run = run  # type: ignore[method-assign]
    rng = np.random.default_rng(5)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave as often as they can
    try:
        for _ in range(50):
            seqs = [[int(t)] * int(n) for t, n in zip(rng.integers(1, 999, 4), rng.permutation(8)[:4] + 1, strict=True)]
            np.testing.assert_array_equal(await submit(batcher, seqs), expected(seqs, token_level))
    finally:
        sys.setswitchinterval(switch)
    await batcher.close()


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
async def test_pooled_and_token_level_callers_sharing_calls_each_get_their_own_rows(pooling: str) -> None:
    """Embed callers ask for pooled rows, KServe callers of the same model for token rows; calls mix both."""
    batcher, backend = make(pooling=pooling, max_batch_size=4, max_batch_tokens=64, instances=2)
    rng = np.random.default_rng(13)
    requests = [
        [rng.integers(1, 1000, size=int(rng.integers(1, 16))).tolist() for _ in range(int(rng.integers(1, 7)))]
        for _ in range(60)
    ]
    wants_pool = [i % 3 != 0 for i in range(len(requests))]
    backend.gate.clear()
    calls = [asyncio.ensure_future(submit(batcher, r, pool=p)) for r, p in zip(requests, wants_pool, strict=True)]
    await until(lambda: backend.active == 2, "two model calls running at once")
    backend.gate.set()
    results = await asyncio.gather(*calls)
    for seqs, pool, got in zip(requests, wants_pool, results, strict=True):
        if pool:
            assert got.shape == (len(seqs), 3)
            np.testing.assert_allclose(got, pooled(seqs, pooling), rtol=1e-6)
        else:
            np.testing.assert_array_equal(got, expected(seqs, True))
    assert batcher.pending == 0
    await batcher.close()
    # One call carrying both kinds: a pooled caller's two sequences and a token-level caller's one, all 2 long.
    batcher, backend = make(pooling=pooling, max_batch_size=8)
    backend.gate.clear()
    first = asyncio.ensure_future(submit(batcher, [[1]]))
    await until(backend.started.is_set, "the first call")
    both = [
        asyncio.ensure_future(submit(batcher, [[2, 3], [4, 5]], pool=True)),
        asyncio.ensure_future(submit(batcher, [[6, 7]])),
    ]
    await until(lambda: batcher.pending == 4, "both callers queued")
    backend.gate.set()
    await first
    got_pooled, got_tokens = await asyncio.gather(*both)
    assert backend.calls == [(1, 1), (3, 2)]
    np.testing.assert_allclose(got_pooled, pooled([[2, 3], [4, 5]], pooling), rtol=1e-6)
    np.testing.assert_array_equal(got_tokens, expected([[6, 7]], True))
    await batcher.close()


async def test_pool_is_ignored_without_a_pooling() -> None:
    """Sequence-level models, and token classification (no pooling), answer as always when pool is asked."""
    for batcher, token_level in ((make(False, pooling=None)[0], False), (make(True, pooling=None)[0], True)):
        assert not batcher.pools(True)
        seqs = [[5, 6, 7], [8]]
        np.testing.assert_array_equal(await submit(batcher, seqs, pool=True), expected(seqs, token_level))
        await batcher.close()
    # A pooling given for a classifier is not used either: its rows are not token rows.
    batcher, _ = make(False, pooling="mean")
    assert batcher.pooling is None and not batcher.pools(True)
    await batcher.close()


def test_the_call_cost_is_fitted_from_one_row_and_many_rows_calls_taken_in_turn() -> None:
    """A model whose call takes 2 ms plus 0.1 ms per padded token costs 20 tokens per call. 30 ms into the
    measurement the machine gets 1.5 times slower: taken in turn, both sizes see the slowdown alike and the fit stays
    near 20 (one size after the other, the slowdown falls on the many-rows calls only and the fit comes out near 6)."""
    from types import SimpleNamespace

    from services.inference.batching import planner

    class Clock:  # the measurement's clock only
        now = 0.0

        def perf_counter(self) -> float:
            return self.now

    clock = Clock()

    class Model:
        def run(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
            slow = 1.5 if clock.now > 0.03 else 1.0  # a busier machine from 30 ms on
            clock.now += slow * (0.002 + 0.0001 * input_ids.size)
            return np.zeros((*input_ids.shape, 4), dtype=np.float32)

    model = SimpleNamespace(max_length=128, config=SimpleNamespace(max_batch_tokens=16384))
    cost = planner.measure_call_cost(Model(), model, clock=clock.perf_counter)  # type: ignore[arg-type]
    assert 15 < cost < 25


async def test_a_high_priority_request_goes_ahead_of_low_priority_calls_already_cut() -> None:
    batcher, backend = make(max_batch_size=1)
    backend.gate.clear()
    ids, types, cu = ragged([[1], [2], [3]])
    low = asyncio.ensure_future(batcher.submit(ids, types, cu, None, priority=Priority.LOW))
    await until(backend.started.is_set, "the first low call")  # [1] runs; [2] and [3] are cut and wait
    ids, types, cu = ragged([[9]])
    high = asyncio.ensure_future(batcher.submit(ids, types, cu, None, priority=Priority.HIGH))
    await until(lambda: batcher.pending == 4, "the high request queued")
    backend.gate.set()
    await asyncio.gather(low, high)
    assert backend.seen == [[1], [9], [2], [3]]
    await batcher.close()


async def test_low_priority_calls_are_not_starved_by_a_stream_of_high_ones() -> None:
    batcher, backend = make(max_batch_size=1)
    backend.gate.clear()
    ids, types, cu = ragged([[1], [2], [3]])
    low = asyncio.ensure_future(batcher.submit(ids, types, cu, None, priority=Priority.LOW))
    await until(backend.started.is_set, "the first low call")
    highs = []
    for i in range(3 * MAX_OVERTAKEN):  # more high requests than a cut call lets go first
        ids, types, cu = ragged([[100 + i]])
        highs.append(asyncio.ensure_future(batcher.submit(ids, types, cu, None, priority=Priority.HIGH)))
    await until(lambda: batcher.pending == 3 + 3 * MAX_OVERTAKEN, "the high requests queued")
    backend.gate.set()
    await asyncio.gather(low, *highs)
    # The cut low call [2] let MAX_OVERTAKEN high calls go first, then ran; the queued high requests then went ahead
    # of [3] only as far as it lets them.
    position = backend.seen.index([2])
    assert position == 1 + MAX_OVERTAKEN
    assert backend.seen.index([3]) <= position + 1 + MAX_OVERTAKEN
    await batcher.close()


async def test_a_nearly_full_queue_refuses_low_priority_first() -> None:
    batcher, backend = make(max_queue_size=8)
    backend.gate.clear()
    ids, types, cu = ragged([[1]] * 6)
    held = asyncio.ensure_future(batcher.submit(ids, types, cu, None, priority=Priority.LOW))
    await until(lambda: batcher.pending == 6, "six sequences admitted")
    one, one_types, one_cu = ragged([[2]])
    with pytest.raises(errors.TandemError) as caught:
        await batcher.submit(one, one_types, one_cu, None, priority=Priority.LOW)
    err = caught.value
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.QUEUE_FULL)
    assert err.message == "model echo is busy: 6 sequences queued, limit 8 (low priority)"
    assert err.metadata == {"model": "echo", "priority": "low"} and err.retry_after_s is not None
    # Normal requests fill the limit; high ones may go an eighth past it.
    normal = asyncio.ensure_future(batcher.submit(*ragged([[3], [4]]), None, priority=Priority.NORMAL))
    high = asyncio.ensure_future(batcher.submit(one, one_types, one_cu, None, priority=Priority.HIGH))
    await until(lambda: batcher.pending == 9, "normal and high admitted")
    with pytest.raises(errors.TandemError) as caught:
        await batcher.submit(one, one_types, one_cu, None, priority=Priority.HIGH)
    assert caught.value.message.endswith("9 sequences queued, limit 8 (high priority)")
    backend.gate.set()
    await asyncio.gather(held, normal, high)
    await batcher.close()


async def test_while_high_priority_work_comes_other_calls_are_cut_short() -> None:
    def batcher_of() -> tuple[Batcher, EchoBackend]:
        backend = EchoBackend(token_level=True)
        # Calls without high-priority rows carry at most 16 padded tokens while high-priority work comes.
        return Batcher(
            backend, ModelConfig(task=Task.EMBEDDING), "echo", call_cost_tokens=16 / SHARED_CALL_COSTS
        ), backend

    seqs = [[i + 1] * 4 for i in range(20)]  # 20 rows of 4 tokens, all alike: one call when nothing else comes
    alone, alone_backend = batcher_of()
    assert np.array_equal(await submit(alone, seqs), expected(seqs, True))
    assert alone_backend.calls == [(20, 4)]
    await alone.close()

    shared, backend = batcher_of()
    ids, types, cu = ragged([[99]])
    await shared.submit(ids, types, cu, None, priority=Priority.HIGH)
    ids, types, cu = ragged(seqs)
    assert np.array_equal(await shared.submit(ids, types, cu, None, priority=Priority.LOW), expected(seqs, True))
    assert backend.calls == [(1, 1)] + [(4, 4)] * 5  # 16 padded tokens a call: 4 rows of 4
    await shared.close()


@pytest.mark.parametrize("kept", [1, 0])
async def test_while_high_priority_work_comes_an_instance_is_kept_for_it(
    kept: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two instances: while high-priority work comes, calls of lower rows run on one of them only, and a high-priority
    request starts on the other beside a held low call instead of behind it (high_priority_instances 0: both take
    low calls)."""
    monkeypatch.setattr(batcher_module, "HIGH_PRIORITY_MEMORY_S", 60.0)
    monkeypatch.setattr(batcher_module, "RESERVE_HIGH_LOAD", 0.0)  # however little of the model it takes
    batcher, backend = make(max_batch_size=1, instances=2, high_priority_instances=kept)
    await batcher.submit(*ragged([[99]]), None, priority=Priority.HIGH)  # high-priority work comes
    backend.gate.clear()
    lows = [asyncio.ensure_future(batcher.submit(*ragged([[i]]), None, priority=Priority.LOW)) for i in (1, 2)]
    await until(lambda: backend.active >= 1, "a low call running")
    if kept:
        for _ in range(20):  # time for the kept instance to take the other low call, were it free to
            await asyncio.sleep(0.005)
            assert backend.active == 1
        high = asyncio.ensure_future(batcher.submit(*ragged([[50]]), None, priority=Priority.HIGH))
        await until(lambda: backend.active == 2, "the high call beside the held low one")
    else:
        await until(lambda: backend.active == 2, "both low calls side by side")
        high = asyncio.ensure_future(batcher.submit(*ragged([[50]]), None, priority=Priority.HIGH))
        await until(lambda: batcher.pending == 3, "the high request queued behind them")
    backend.gate.set()
    high_rows, *low_rows = await asyncio.gather(high, *lows)
    np.testing.assert_array_equal(high_rows, expected([[50]], True))
    for i, rows in zip((1, 2), low_rows, strict=True):
        np.testing.assert_array_equal(rows, expected([[i]], True))
    assert backend.most_active == 2
    await batcher.close()


async def test_an_instance_is_kept_only_while_high_priority_calls_take_a_share_of_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A trickle of quick high-priority calls keeps no instance (it would idle); calls that took RESERVE_HIGH_LOAD of
    an instance's time over the memory do."""
    monkeypatch.setattr(batcher_module, "HIGH_PRIORITY_MEMORY_S", 60.0)
    monkeypatch.setattr(batcher_module, "RESERVE_HIGH_LOAD", 0.2 / 60)  # 0.2 s of high-priority model time a minute
    batcher, backend = make(max_batch_size=1, instances=2)

    async def lows_side_by_side() -> int:
        """How many of two held low calls run at once."""
        backend.gate.clear()
        lows = [asyncio.ensure_future(batcher.submit(*ragged([[i]]), None, priority=Priority.LOW)) for i in (1, 2)]
        await until(lambda: backend.active >= 1, "a low call running")
        for _ in range(20):  # time for the other instance to take the other low call, were it free to
            await asyncio.sleep(0.005)
        active = backend.active
        backend.gate.set()
        await asyncio.gather(*lows)
        return active

    await batcher.submit(*ragged([[99]]), None, priority=Priority.HIGH)  # a quick one: microseconds of model time
    assert await lows_side_by_side() == 2
    backend.gate.clear()
    slow = asyncio.ensure_future(batcher.submit(*ragged([[98]]), None, priority=Priority.HIGH))
    await until(lambda: backend.active == 1, "the high call running")
    await asyncio.sleep(0.3)  # held: 0.3 s of model time
    backend.gate.set()
    await slow
    assert await lows_side_by_side() == 1
    await batcher.close()


async def test_the_kept_instance_runs_any_call_once_high_priority_work_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batcher_module, "HIGH_PRIORITY_MEMORY_S", 0.05)
    monkeypatch.setattr(batcher_module, "RESERVE_HIGH_LOAD", 0.0)
    batcher, backend = make(max_batch_size=1, instances=2)
    await batcher.submit(*ragged([[99]]), None, priority=Priority.HIGH)
    await asyncio.sleep(0.1)  # past the high-priority work's memory
    backend.gate.clear()
    lows = [asyncio.ensure_future(batcher.submit(*ragged([[i]]), None, priority=Priority.LOW)) for i in (1, 2)]
    await until(lambda: backend.active == 2, "both low calls side by side")
    backend.gate.set()
    await asyncio.gather(*lows)
    await batcher.close()


def test_an_instance_is_kept_for_high_priority_work_only_where_one_is_left_for_the_rest() -> None:
    def kept(instances: int, asked: int) -> int:
        config = ModelConfig(task=Task.EMBEDDING, instances=instances, high_priority_instances=asked)
        return Batcher(EchoBackend(token_level=True), config, "echo")._reserved

    assert (kept(1, 1), kept(2, 1), kept(2, 2), kept(4, 2), kept(4, 0)) == (0, 1, 1, 2, 0)


async def test_in_a_round_with_high_priority_rows_they_get_calls_of_their_own() -> None:
    """A round taken while calls run mixes levels; the high-priority rows never share a call with lower rows (which
    would hold them to a call as long as the round allows), and go first."""
    batcher, backend = make()
    backend.gate.clear()
    first = asyncio.ensure_future(submit(batcher, [[7, 7]]))
    await until(backend.started.is_set, "a call holding the only instance")
    lows = [[i + 1] * 3 for i in range(6)]
    low = asyncio.ensure_future(batcher.submit(*ragged(lows), None, priority=Priority.LOW))
    high = asyncio.ensure_future(batcher.submit(*ragged([[50, 50, 50]]), None, priority=Priority.HIGH))
    await until(lambda: batcher.pending == 8, "both queued behind the running call")
    backend.gate.set()
    low_rows, high_rows, _ = await asyncio.gather(low, high, first)
    np.testing.assert_array_equal(low_rows, expected(lows, True))
    np.testing.assert_array_equal(high_rows, expected([[50, 50, 50]], True))
    # [7, 7] ran first; then the high row alone (all rows are 3 tokens: without the split, one call of 7 rows).
    assert backend.calls[:2] == [(1, 2), (1, 3)]
    assert backend.seen[1] == [50, 50, 50]
    assert sum(rows for rows, _ in backend.calls[2:]) == 6
    await batcher.close()


async def test_calls_of_low_priority_rows_run_on_less_urgent_threads() -> None:
    backend = EchoBackend(token_level=True)
    niceness: list[tuple[int, int]] = []
    plain_run = backend.run

    def run(input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        niceness.append((int(input_ids[0, 0]), os.getpriority(os.PRIO_PROCESS, 0)))  # 0: the calling thread
        return plain_run(input_ids, attention_mask, token_type_ids)

    backend.run = run  # type: ignore[method-assign]
    batcher = Batcher(backend, ModelConfig(task=Task.EMBEDDING), "echo", nice=2)
    loop_niceness = os.getpriority(os.PRIO_PROCESS, 0)
    await batcher.submit(*ragged([[1]]), None, priority=Priority.LOW)
    await batcher.submit(*ragged([[2]]), None, priority=Priority.NORMAL)
    await batcher.submit(*ragged([[3]]), None, priority=Priority.HIGH)
    assert niceness == [
        (1, min(loop_niceness + 2 + LOW_PRIORITY_NICE, 19)),
        (2, min(loop_niceness + 2, 19)),
        (3, min(loop_niceness + 2, 19)),
    ]
    await batcher.close()
