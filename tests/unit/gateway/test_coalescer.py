"""The gateway's request coalescer: merged runs, exact per-caller slices, errors and cancellation."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from gateway.coalescer import MAX_RETRY_S, MIN_RETRY_S, RETRY_JITTER, Coalescer
from gateway.priority import current_priority
from services.common import errors
from services.common.errors import Reason
from services.common.priority import Priority


class Recorder:
    """A pipeline stand-in that echoes its inputs, upper-cased, and records each run."""

    def __init__(self, delay_s: float = 0.01, fail_on: str | None = None) -> None:
        self.runs: list[list[str]] = []
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.started = asyncio.Event()

    async def run(self, key: str, inputs: list[str], deadline: float) -> list[str]:
        self.runs.append(list(inputs))
        self.started.set()
        await asyncio.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in inputs:
            raise ValueError(f"bad input {self.fail_on}")
        return [f"{key}:{text.upper()}" for text in inputs]


class Clock:
    """Stands in for the coalescer module's `time` (the event loop keeps the real clock); tests move `now`."""

    now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    from gateway import coalescer as module

    fake = Clock()
    monkeypatch.setattr(module, "time", fake)
    return fake


def split(result: list[str], counts: list[int]) -> list[list[str]]:
    out, start = [], 0
    for n in counts:
        out.append(result[start : start + n])
        start += n
    return out


async def test_every_caller_gets_exactly_its_own_rows() -> None:
    recorder = Recorder()
    coalescer: Coalescer[str, list[str]] = Coalescer(recorder.run, split, max_inputs=64)
    rng = random.Random(1)
    requests = [[f"r{i}-{j}" for j in range(rng.randint(1, 7))] for i in range(200)]
    keys = [rng.choice(["a", "b"]) for _ in requests]
    results = await asyncio.gather(*(coalescer.submit(k, r, 1e9) for k, r in zip(keys, requests, strict=True)))
    for key, request, result in zip(keys, requests, results, strict=True):
        assert result == [f"{key}:{t.upper()}" for t in request]
    assert coalescer.runs < len(requests) / 4  # merged, not one run per caller
    assert all(sum(1 for _ in run) <= 64 for run in recorder.runs)


async def test_an_idle_key_starts_at_once_with_just_that_request() -> None:
    recorder = Recorder()
    coalescer: Coalescer[str, list[str]] = Coalescer(recorder.run, split)
    assert await coalescer.submit("k", ["only"], 1e9) == ["k:ONLY"]
    assert recorder.runs == [["only"]]


async def test_a_failed_run_fails_its_callers_only() -> None:
    recorder = Recorder(fail_on="poison")
    coalescer: Coalescer[str, list[str]] = Coalescer(recorder.run, split, max_inflight=1)
    first = asyncio.create_task(coalescer.submit("k", ["fine"], 1e9))
    await recorder.started.wait()
    merged = [asyncio.create_task(coalescer.submit("k", [t], 1e9)) for t in ("poison", "x")]
    done = await asyncio.gather(first, *merged, return_exceptions=True)
    assert done[0] == ["k:FINE"]
    assert all(isinstance(d, ValueError) and "poison" in str(d) for d in done[1:])
    assert await coalescer.submit("k", ["after"], 1e9) == ["k:AFTER"]


async def test_a_cancelled_caller_is_dropped_before_its_run() -> None:
    recorder = Recorder(delay_s=0.05)
    coalescer: Coalescer[str, list[str]] = Coalescer(recorder.run, split, max_inflight=1)
    first = asyncio.create_task(coalescer.submit("k", ["first"], 1e9))
    await recorder.started.wait()
    doomed = asyncio.create_task(coalescer.submit("k", ["doomed"], 1e9))
    kept = asyncio.create_task(coalescer.submit("k", ["kept"], 1e9))
    await asyncio.sleep(0)
    doomed.cancel()
    assert await first == ["k:FIRST"]
    assert await kept == ["k:KEPT"]
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert recorder.runs == [["first"], ["kept"]]


async def test_a_merged_run_too_large_for_the_stage_is_split_not_failed() -> None:
    """A stage refuses more than 3 inputs per request: merged callers are re-run in smaller merges, none fails;
    a single caller that alone is too large still gets the stage's INVALID_ARGUMENT."""
    from services.common import errors

    sizes: list[int] = []

    async def run(key: str, inputs: list[str], deadline: float) -> list[str]:
        sizes.append(len(inputs))
        await asyncio.sleep(0.01)
        if len(inputs) > 3:
            raise errors.invalid_argument(
                f"{len(inputs)} sequences exceed the limit of 3 per request", "batch", reason=Reason.TOO_MANY_INPUTS
            )
        return [text.upper() for text in inputs]

    coalescer: Coalescer[str, list[str]] = Coalescer(run, split, max_inputs=64, max_inflight=1)
    requests = [[f"t{i}"] for i in range(12)]
    results = await asyncio.gather(*(coalescer.submit("k", r, 1e9) for r in requests))
    assert results == [[f"T{i}"] for i in range(12)]
    assert max(sizes) > 3  # the first merge was too large ...
    assert sizes[-1] <= 3  # ... and later merges fit
    with pytest.raises(errors.TandemError) as caught:
        await coalescer.submit("k", ["a", "b", "c", "d"], 1e9)
    assert (caught.value.code, errors.reason_of(caught.value)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "TOO_MANY_INPUTS",
    )


async def test_past_max_queued_a_request_is_refused_at_once() -> None:
    """With one text in a run in flight and 3 waiting, a fifth is refused with RESOURCE_EXHAUSTED and RetryInfo
    while the run is still going; the admitted ones are all served."""
    from services.common import errors

    recorder = Recorder(delay_s=0.2)
    coalescer: Coalescer[str, list[str]] = Coalescer(recorder.run, split, max_inflight=1, max_queued=4)
    first = asyncio.ensure_future(coalescer.submit("k", ["running"], 1e9))
    await recorder.started.wait()
    waiting = [asyncio.ensure_future(coalescer.submit("k", [f"w{i}"], 1e9)) for i in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(errors.TandemError) as caught:
        await coalescer.submit("k", ["one too many"], 1e9)
    assert not first.done()  # refused without waiting for the run in flight
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert errors.reason_of(caught.value) == "QUEUE_FULL" and caught.value.retry_after_s is not None
    assert "too many texts in progress for this model at the gateway: 4, limit 4" in str(caught.value)
    assert await first == ["k:RUNNING"]
    assert await asyncio.gather(*waiting) == [[f"k:W{i}"] for i in range(3)]
    # Having seen answers take about 0.2 s or more, the next refusal asks callers to wait longer than the minimum.
    for _ in range(4):
        admitted = [asyncio.ensure_future(coalescer.submit("k", [f"x{i}"], 1e9)) for i in range(4)]
        await asyncio.sleep(0)
        with pytest.raises(errors.TandemError) as again:
            await coalescer.submit("k", ["refused"], 1e9)
        await asyncio.gather(*admitted)
    assert again.value.retry_after_s is not None
    assert MIN_RETRY_S < again.value.retry_after_s <= MAX_RETRY_S
    assert await coalescer.submit("k", ["later"], 1e9) == ["k:LATER"]  # the count went back down


async def test_refused_callers_are_told_to_come_back_in_turn(clock: Clock) -> None:
    """Each caller refused while others are already told to wait is asked to wait longer, by its place: a crowd of
    refused callers comes back spread out instead of all at once. Once their suggested times pass, the delay falls
    back to the base one; the refused inputs (2 for one caller) count for their size. Past MAX_RETRY_S the delays
    are spread below it instead of all being the same."""
    from services.common import errors

    release = asyncio.Event()

    async def held(key: str, inputs: list[str], deadline: float) -> list[str]:
        await release.wait()  # the admitted texts stay in progress until the test is done refusing
        return [f"{key}:{text.upper()}" for text in inputs]

    # Without the random spread, to see each caller's place (the spread has its own test below).
    coalescer: Coalescer[str, list[str]] = Coalescer(held, split, max_inflight=1, max_queued=4, retry_jitter=0)
    admitted = [asyncio.ensure_future(coalescer.submit("k", [f"a{i}"], 1e9)) for i in range(4)]
    await asyncio.sleep(0)

    async def refused(inputs: list[str]) -> float:
        with pytest.raises(errors.TandemError) as caught:
            await coalescer.submit("k", inputs, 1e9)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert errors.reason_of(caught.value) == "QUEUE_FULL"
        assert caught.value.retry_after_s is not None
        return caught.value.retry_after_s

    first = await refused(["r0"])
    second = await refused(["r1", "r2"])
    third = await refused(["r3"])
    # No answer seen yet, so the base delay is the minimum; then 1 and 3 inputs ahead of a limit of 4.
    assert first == pytest.approx(MIN_RETRY_S)
    assert second == pytest.approx(MIN_RETRY_S * (1 + 1 / 4))
    assert third == pytest.approx(MIN_RETRY_S * (1 + 3 / 4))
    clock.now += third  # every suggested time has passed: nobody is waiting any more
    assert await refused(["r4"]) == pytest.approx(MIN_RETRY_S)
    clock.now += MIN_RETRY_S
    # A crowd: the stretch grows to the cap (1 + 155 / 4 times the minimum is 1.99 s), then delays spread below it.
    crowd = [await refused([f"c{i}"]) for i in range(200)]
    assert crowd[:156] == [pytest.approx(MIN_RETRY_S * (1 + i / 4)) for i in range(156)]
    assert all(MIN_RETRY_S <= d <= MAX_RETRY_S for d in crowd)
    capped = crowd[160:]
    assert len(set(capped)) > 1
    release.set()
    assert await asyncio.gather(*admitted) == [[f"k:A{i}"] for i in range(4)]


async def test_a_caller_that_gives_up_frees_its_place_at_once() -> None:
    recorder = Recorder(delay_s=0.2)
    coalescer: Coalescer[str, list[str]] = Coalescer(recorder.run, split, max_inflight=1, max_queued=2)
    first = asyncio.ensure_future(coalescer.submit("k", ["running"], 1e9))
    await recorder.started.wait()
    gave_up = asyncio.ensure_future(coalescer.submit("k", ["impatient"], 1e9))
    await asyncio.sleep(0)
    gave_up.cancel()
    await asyncio.sleep(0)
    # The running text and the cancelled one held both places; the cancelled one's is free again.
    assert await coalescer.submit("k", ["next"], 1e9) == ["k:NEXT"]
    assert await first == ["k:RUNNING"]
    assert all("impatient" not in run for run in recorder.runs)


async def test_a_learned_merge_limit_is_forgotten_after_a_while() -> None:
    """A stage whose limit grew (a new version with a larger queue) gets large merged runs again."""
    from services.common import errors

    limit = 3
    sizes: list[int] = []

    async def run(key: str, inputs: list[str], deadline: float) -> list[str]:
        sizes.append(len(inputs))
        await asyncio.sleep(0.01)
        if len(inputs) > limit:
            raise errors.invalid_argument("too many", "batch", reason=Reason.TOO_MANY_INPUTS)
        return [text.upper() for text in inputs]

    coalescer: Coalescer[str, list[str]] = Coalescer(run, split, max_inputs=64, max_inflight=1, cap_ttl_s=0.2)
    await asyncio.gather(*(coalescer.submit("k", [f"t{i}"], 1e9) for i in range(12)))
    assert max(sizes) > 3 and sizes[-1] <= 3  # learned (a too-large run is re-run smaller, never answered)
    limit, sizes[:] = 64, []
    await asyncio.sleep(0.3)  # past the learned limit's lifetime
    await asyncio.gather(*(coalescer.submit("k", [f"u{i}"], 1e9) for i in range(12)))
    assert max(sizes) > 3  # merges are large again


class Gated:
    """A pipeline stand-in whose runs wait for the test to open the gate; records each run and its priority."""

    def __init__(self) -> None:
        self.runs: list[tuple[list[str], Priority]] = []
        self.gate = asyncio.Event()

    async def run(self, key: str, inputs: list[str], deadline: float) -> list[str]:
        self.runs.append((list(inputs), current_priority.get()))
        await self.gate.wait()
        return [text.upper() for text in inputs]


async def submit_at(coalescer: Coalescer[str, list[str]], level: Priority, text: str) -> list[str]:
    """A caller whose call runs at `level`, as the gateway's PriorityInterceptor sets it."""
    current_priority.set(level)
    return await coalescer.submit("k", [text], 1e9)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_high_priority_callers_get_a_run_of_their_own_when_every_slot_is_taken() -> None:
    gated = Gated()
    coalescer: Coalescer[str, list[str]] = Coalescer(gated.run, split, max_inflight=1)
    low = [asyncio.ensure_future(submit_at(coalescer, Priority.LOW, f"low{i}")) for i in range(3)]
    await settle()
    high = [asyncio.ensure_future(submit_at(coalescer, Priority.HIGH, f"high{i}")) for i in range(2)]
    await settle()
    # The slot holds low0; low1 and low2 wait for it; high0 runs beside it at once (as many such runs as slots).
    assert gated.runs == [(["low0"], Priority.LOW), (["high0"], Priority.HIGH)]
    gated.gate.set()
    assert await asyncio.gather(*high) == [["HIGH0"], ["HIGH1"]]
    assert await asyncio.gather(*low) == [["LOW0"], ["LOW1"], ["LOW2"]]
    # high1 waited for the first run to end and went before the low callers that came earlier, in a run of its own
    # (a run merges one level).
    assert gated.runs[2:] == [(["high1"], Priority.HIGH), (["low1", "low2"], Priority.LOW)]


async def test_waiting_callers_are_served_by_priority_and_low_ones_still_run() -> None:
    gated = Gated()
    coalescer: Coalescer[str, list[str]] = Coalescer(gated.run, split, max_inputs=1, max_inflight=1)
    calls = [asyncio.ensure_future(submit_at(coalescer, Priority.LOW, f"low{i}")) for i in range(4)]
    await settle()
    calls += [asyncio.ensure_future(submit_at(coalescer, Priority.NORMAL, f"normal{i}")) for i in range(3)]
    calls += [asyncio.ensure_future(submit_at(coalescer, Priority.HIGH, f"high{i}")) for i in range(3)]
    await settle()
    gated.gate.set()
    await asyncio.gather(*calls)
    order = [run[0][0] for run in gated.runs]
    # low0 held the slot and high0 ran beside it; then the higher levels first, each in its own order.
    assert order[:2] == ["low0", "high0"]
    assert order[2:] == ["high1", "high2", "normal0", "normal1", "normal2", "low1", "low2", "low3"]
    # Each run goes through the stages at its callers' level.
    assert [level for _, level in gated.runs][2:] == [Priority.HIGH] * 2 + [Priority.NORMAL] * 3 + [Priority.LOW] * 3


async def test_admission_refuses_low_priority_first() -> None:
    gated = Gated()
    coalescer: Coalescer[str, list[str]] = Coalescer(gated.run, split, max_inflight=1, max_queued=8)
    admitted = [asyncio.ensure_future(submit_at(coalescer, Priority.LOW, f"low{i}")) for i in range(6)]
    await settle()
    current_priority.set(Priority.LOW)
    with pytest.raises(errors.TandemError) as caught:
        await coalescer.submit("k", ["one more"], 1e9)
    err = caught.value
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.QUEUE_FULL)
    assert err.message == "too many texts in progress for this model at the gateway: 6, limit 8 (low priority)"
    assert err.metadata == {"priority": "low"} and err.retry_after_s is not None and err.retry_after_s > 0
    # Normal callers still fill the limit, high ones an eighth past it.
    admitted += [asyncio.ensure_future(submit_at(coalescer, Priority.NORMAL, f"n{i}")) for i in range(2)]
    await settle()
    current_priority.set(Priority.NORMAL)
    with pytest.raises(errors.TandemError) as caught:
        await coalescer.submit("k", ["n3"], 1e9)
    assert caught.value.metadata == {"priority": "normal"}
    admitted.append(asyncio.ensure_future(submit_at(coalescer, Priority.HIGH, "h")))
    await settle()
    current_priority.set(Priority.HIGH)
    with pytest.raises(errors.TandemError) as caught:
        await coalescer.submit("k", ["h2"], 1e9)
    assert caught.value.message.endswith("9, limit 8 (high priority)")
    gated.gate.set()
    assert len(await asyncio.gather(*admitted)) == 9


async def test_express_runs_go_up_to_as_many_again_as_the_run_slots() -> None:
    gated = Gated()
    coalescer: Coalescer[str, list[str]] = Coalescer(gated.run, split, max_inflight=2)
    low = [asyncio.ensure_future(submit_at(coalescer, Priority.LOW, f"low{i}")) for i in range(3)]
    await settle()
    high = []
    for i in range(3):
        high.append(asyncio.ensure_future(submit_at(coalescer, Priority.HIGH, f"high{i}")))
        await settle()
    # Two slots hold low runs; high0 and high1 each got an express run at once; high2 waits for the next free run.
    assert [run[0] for run in gated.runs] == [["low0"], ["low1"], ["high0"], ["high1"]]
    gated.gate.set()
    await asyncio.gather(*low, *high)
    assert [run[0] for run in gated.runs][4:] == [["high2"], ["low2"]]
    assert not coalescer._express and not coalescer._inflight


async def test_refused_callers_wait_for_answers_of_their_own_level(clock: Clock) -> None:
    """RetryInfo delays are per level: a refused low-priority caller is told the low-priority answer time, not an
    average pulled down by fast high-priority runs, stretched by the callers ahead of it in units of the low level's
    share of the places (6 of 8)."""
    answer_s = {Priority.HIGH: 0.02, Priority.LOW: 0.4}
    gate: asyncio.Event | None = None

    async def run(key: str, inputs: list[str], deadline: float) -> list[str]:
        if gate is not None:
            await gate.wait()
        clock.now += answer_s[current_priority.get()]  # the run took this long
        return [text.upper() for text in inputs]

    coalescer: Coalescer[str, list[str]] = Coalescer(run, split, max_inflight=1, max_queued=8, retry_jitter=0)
    assert await submit_at(coalescer, Priority.HIGH, "fast") == ["FAST"]
    assert await submit_at(coalescer, Priority.LOW, "slow") == ["SLOW"]
    gate = asyncio.Event()
    held = [asyncio.ensure_future(submit_at(coalescer, Priority.LOW, f"low{i}")) for i in range(6)]
    await settle()
    delays = []
    for i in range(2):
        with pytest.raises(errors.TandemError) as caught:
            await submit_at(coalescer, Priority.LOW, f"refused{i}")
        assert caught.value.retry_after_s is not None
        delays.append(caught.value.retry_after_s)
    assert delays == [pytest.approx(0.4), pytest.approx(0.4 * (1 + 1 / 6))]
    gate.set()
    assert len(await asyncio.gather(*held)) == 6


async def test_retry_delays_are_spread_at_random_around_each_callers_place(clock: Clock) -> None:
    """By default each delay under the cap is its place's delay times 1 +/- RETRY_JITTER, at random, so that refused
    callers do not come back in step with the runs that free places; within the bounds, and recorded as promised."""
    from services.common import errors

    release = asyncio.Event()

    async def held(key: str, inputs: list[str], deadline: float) -> list[str]:
        await release.wait()
        return inputs

    coalescer: Coalescer[str, list[str]] = Coalescer(held, split, max_inflight=1, max_queued=4, rng=random.Random(7))
    admitted = [asyncio.ensure_future(coalescer.submit("k", [f"a{i}"], 1e9)) for i in range(4)]
    await asyncio.sleep(0)
    delays = []
    for i in range(100):
        with pytest.raises(errors.TandemError) as caught:
            await coalescer.submit("k", [f"r{i}"], 1e9)
        assert caught.value.retry_after_s is not None
        delays.append(caught.value.retry_after_s)
        clock.now += 1.0  # every earlier caller's time has passed: each one's place is the first (base delay)
    assert all(MIN_RETRY_S <= d <= MIN_RETRY_S * (1 + RETRY_JITTER) for d in delays)
    assert min(delays) == MIN_RETRY_S  # spread below the floor: clamped to it
    assert len({round(d, 9) for d in delays}) > 30 and max(delays) > MIN_RETRY_S * 1.4
    release.set()
    await asyncio.gather(*admitted)


async def test_a_run_whose_callers_all_left_is_cancelled_and_frees_its_slot() -> None:
    cancelled = asyncio.Event()
    release = asyncio.Event()
    runs: list[list[str]] = []

    async def run(key: str, inputs: list[str], deadline: float) -> list[str]:
        runs.append(list(inputs))
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return [text.upper() for text in inputs]

    coalescer: Coalescer[str, list[str]] = Coalescer(run, split, max_inflight=1)
    first = asyncio.ensure_future(coalescer.submit("m", ["a"], deadline=1e9))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(coalescer.submit("m", ["b"], deadline=1e9))  # waits: the only slot is taken
    await asyncio.sleep(0)
    assert runs == [["a"]]
    first.cancel()
    await asyncio.wait_for(cancelled.wait(), 5)  # the run of a caller that left stops
    await asyncio.sleep(0)
    assert runs == [["a"], ["b"]]  # and its slot went to the next run at once
    release.set()
    assert await asyncio.wait_for(second, 5) == ["B"]
    await coalescer.close()


async def test_a_run_keeps_going_while_one_of_its_callers_waits() -> None:
    recorder = Recorder(delay_s=0.05)
    coalescer: Coalescer[str, list[str]] = Coalescer(recorder.run, split, max_inflight=1)
    blocker = asyncio.ensure_future(coalescer.submit("m", ["x"], deadline=1e9))
    await asyncio.sleep(0)
    leaving = asyncio.ensure_future(coalescer.submit("m", ["a"], deadline=1e9))
    staying = asyncio.ensure_future(coalescer.submit("m", ["b"], deadline=1e9))
    await blocker
    await asyncio.sleep(0)  # "a" and "b" are merged into one run
    leaving.cancel()
    assert await staying == ["m:B"]
    assert recorder.runs[-1] == ["a", "b"]
    await coalescer.close()
