"""Priority levels and the weighted queue: parsing, admission shares, and service by weight without starvation."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import grpc
import pytest

from services.common import errors
from services.common.errors import Reason
from services.common.priority import ADMISSION_SHARES, WEIGHTS, Priority, WeightedQueue, admits, parse

H, N, L = Priority.HIGH, Priority.NORMAL, Priority.LOW


@pytest.mark.parametrize(
    ("value", "level"),
    [
        ("high", H),
        (" Normal ", N),
        ("LOW", L),
        ("1", H),
        ("3", L),
        (2, N),
        (b"low", L),
        ("", None),
        ("0", None),
        (0, None),
    ],
)
def test_levels_parse_by_name_or_triton_number(value: object, level: Priority | None) -> None:
    assert parse(value, "x-tandem-priority") == level


@pytest.mark.parametrize("value", ["urgent", "4", -1, 7, 1.0, True, "h igh", "-1"])
def test_anything_else_is_invalid_argument_naming_the_field(value: object) -> None:
    with pytest.raises(errors.TandemError) as caught:
        parse(value, "parameters[priority]")
    err = caught.value
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_INPUT)
    assert [v.field for v in err.violations] == ["parameters[priority]"]
    assert "must be one of high (1), normal (2), low (3)" in err.message


def test_admission_keeps_the_last_places_for_higher_levels() -> None:
    limit = 64
    assert ADMISSION_SHARES[N] == 1.0  # the default level keeps the whole limit, as before priorities
    assert admits(N, 63, 1, limit) and not admits(N, 64, 1, limit)
    assert admits(L, 47, 1, limit) and not admits(L, 48, 1, limit)
    assert admits(H, 64, 8, limit) and not admits(H, 72, 1, limit)
    # An empty queue takes any request, however large.
    assert admits(L, 0, 1000, limit)


def drain(queue: WeightedQueue[Any], n: int) -> list[Priority]:
    return [queue.pop()[1] for _ in range(n)]


def test_one_level_alone_is_first_in_first_out() -> None:
    queue: WeightedQueue[str] = WeightedQueue()
    for i in range(5):
        queue.push(f"l{i}", L)
    assert [queue.pop()[0] for _ in range(5)] == [f"l{i}" for i in range(5)]
    assert not queue
    with pytest.raises(IndexError):
        queue.pop()


def test_a_high_item_joining_a_long_low_queue_is_next() -> None:
    queue: WeightedQueue[str] = WeightedQueue()
    for i in range(100):
        queue.push(f"l{i}", L)
    drain(queue, 50)  # low has been served a while: no credit saved up by the idle high level
    queue.push("h", H)
    assert queue.pop() == ("h", H)
    assert queue.pop() == ("l50", L)


def test_a_constant_stream_of_high_items_does_not_starve_low_ones() -> None:
    queue: WeightedQueue[int] = WeightedQueue()
    for i in range(500):
        queue.push(i, L)
    served: list[tuple[int, Priority]] = []
    for i in range(1300):
        queue.push(i, H)  # high and normal items keep coming, one each per pop: neither level is ever empty
        queue.push(i, N)
        served.append(queue.pop())
    counts = Counter(level for _, level in served)
    total = sum(WEIGHTS.values())
    # Low is served at its weight's share (1/13), in its own order, however busy the higher levels are.
    assert counts[L] == pytest.approx(1300 * WEIGHTS[L] / total, abs=2)
    assert counts[H] == pytest.approx(1300 * WEIGHTS[H] / total, abs=2)
    low = [item for item, level in served if level == L]
    assert low == list(range(len(low)))
    # Never a long wait either: between two low items at most about 13 others.
    positions = [n for n, (_, level) in enumerate(served) if level == L]
    assert max(b - a for a, b in itertools.pairwise(positions)) <= 14


def test_every_backlogged_level_gets_its_weight() -> None:
    queue: WeightedQueue[int] = WeightedQueue()
    for level in Priority:
        for i in range(2000):
            queue.push(i, level)
    counts = Counter(drain(queue, 1300))
    total = sum(WEIGHTS.values())
    for level in Priority:
        assert counts[level] == pytest.approx(1300 * WEIGHTS[level] / total, abs=2)


def test_cost_counts_against_a_level_s_share() -> None:
    queue: WeightedQueue[str] = WeightedQueue({H: 1.0, N: 1.0, L: 1.0})
    for i in range(10):
        queue.push(f"big{i}", N, cost=4)
        queue.push(f"small{i}", L, cost=1)
    order = drain(queue, 10)
    # Equal weights, but normal's items cost four times as much: low is served about four times as often.
    assert order.count(L) >= 3 * order.count(N)


def test_push_front_and_popping_one_level() -> None:
    queue: WeightedQueue[str] = WeightedQueue()
    queue.push("l1", L)
    queue.push("h1", H)
    queue.push("h2", H)
    assert queue.best() == H and queue.waiting(H) == 2
    assert queue.pop(L) == ("l1", L)
    assert queue.peek(L) is None
    queue.push_front("h0", H)
    assert queue.peek() == "h0"
    assert [queue.pop()[0] for _ in range(3)] == ["h0", "h1", "h2"]
    assert queue.best() is None and queue.next_level() is None
