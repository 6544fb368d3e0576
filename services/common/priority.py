"""Request priority: the three levels, what they weigh, and the weighted queue that serves them without starving any.

Levels are numbered as Triton numbers them, 1 the highest, so that an Open Inference Protocol `priority` parameter
means the same here as there (0 there means "the default", which the caller's API key decides here). The inference
stage's InferRequest.priority uses the same numbers (tandem.inference.v1.Priority).

Weighted, not strict: a strict order lets a steady stream of high-priority work starve everything else. The queue is
stride scheduling (weighted fair queueing over classes): each level keeps a virtual "pass" that grows by the cost of
what it was served divided by its weight, and the next item comes from the level whose head would finish first. While
every level is backlogged, each gets its weight's share of the service (8:4:1, so low still gets about 1/13), and a
level that was idle joins at the current virtual time, so it neither saved up credit while idle nor waits behind
what others were served before it came: a lone high-priority request is next at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from enum import IntEnum
from typing import Generic, TypeVar

from services.common import errors

T = TypeVar("T")


class Priority(IntEnum):
    """A request's priority; a lower number is served first (as in Triton)."""

    HIGH = 1
    NORMAL = 2
    LOW = 3

    @property
    def label(self) -> str:
        """The documented name: high, normal or low (metrics labels, logs, metadata)."""
        return self.name.lower()


DEFAULT = Priority.NORMAL
# Shares of the service while every level is backlogged (see the module's note).
WEIGHTS: dict[Priority, float] = {Priority.HIGH: 8.0, Priority.NORMAL: 4.0, Priority.LOW: 1.0}
# The share of a queue's limit (the gateway's --coalesce-max-queued, a model's max_queue_size) a level may fill. The
# default level keeps the whole limit, so nothing changes for callers that never name a priority; low-priority work
# leaves the last quarter free and high-priority work may go an eighth past it. Under overload the low-priority
# callers are the ones refused (RESOURCE_EXHAUSTED), and a high-priority request still finds room in a queue that
# normal traffic filled.
ADMISSION_SHARES: dict[Priority, float] = {Priority.HIGH: 1.125, Priority.NORMAL: 1.0, Priority.LOW: 0.75}
NAMES = ", ".join(f"{p.label} ({p.value})" for p in Priority)


def parse(value: object, field: str) -> Priority | None:
    """A level from its name or number (high/normal/low, 1/2/3; case and spaces ignored); None for 0 or "" (the
    default: the caller's key decides). Anything else is INVALID_ARGUMENT naming `field`."""
    if isinstance(value, bool):  # a bool is an int to Python, but never a level
        raise _invalid(value, field)
    if isinstance(value, int):
        if value == 0:
            return None
        if value in Priority._value2member_map_:
            return Priority(value)
        raise _invalid(value, field)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise _invalid(value, field)
    text = value.strip().lower()
    if text in ("", "0"):
        return None
    if text.isdigit() and int(text) in Priority._value2member_map_:
        return Priority(int(text))
    for level in Priority:
        if text == level.label:
            return level
    raise _invalid(value, field)


def _invalid(value: object, field: str) -> errors.TandemError:
    shown = repr(value)[:40]
    return errors.invalid_argument(f"{field} must be one of {NAMES}, got {shown}", field)


def admits(priority: Priority, pending: int, count: int, limit: int) -> bool:
    """Whether `count` more items of `priority` fit a queue holding `pending` with room for `limit` (an empty queue
    takes any request, as before: a request bigger than the share is still served when alone)."""
    return not pending or pending + count <= limit * ADMISSION_SHARES[priority]


class WeightedQueue(Generic[T]):
    """FIFO per level, served across levels by stride scheduling (see the module's note). `cost` is what an item
    takes to serve (texts, sequences): a large low-priority request uses more of its level's share than a small one."""

    def __init__(self, weights: dict[Priority, float] | None = None) -> None:
        self.weights = weights or WEIGHTS
        self._queues: dict[Priority, deque[tuple[T, float]]] = {p: deque() for p in Priority}
        self._pass: dict[Priority, float] = dict.fromkeys(Priority, 0.0)
        self._clock = 0.0  # virtual time: the start tag of the item served last
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def __bool__(self) -> bool:
        return self._length > 0

    def __iter__(self) -> Iterator[T]:
        """Every queued item, highest level first (not the order they will be served in)."""
        for level in Priority:
            for item, _ in self._queues[level]:
                yield item

    def waiting(self, priority: Priority) -> int:
        return len(self._queues[priority])

    def push(self, item: T, priority: Priority, cost: float = 1.0) -> None:
        queue = self._queues[priority]
        if not queue:  # an idle level joins at the current virtual time: no credit saved up, no debt carried
            self._pass[priority] = max(self._pass[priority], self._clock)
        queue.append((item, cost))
        self._length += 1

    def push_front(self, item: T, priority: Priority, cost: float = 1.0) -> None:
        """Back at the head of its level (work taken and given back, to be served next within the level)."""
        queue = self._queues[priority]
        if not queue:
            self._pass[priority] = max(self._pass[priority], self._clock)
        queue.appendleft((item, cost))
        self._length += 1

    def next_level(self) -> Priority | None:
        """The level the next pop serves, or None when empty."""
        best: Priority | None = None
        best_finish = 0.0
        for level in Priority:  # highest first, so a tie goes to the higher level
            queue = self._queues[level]
            if not queue:
                continue
            finish = self._pass[level] + queue[0][1] / self.weights[level]
            if best is None or finish < best_finish:
                best, best_finish = level, finish
        return best

    def peek(self, level: Priority | None = None) -> T | None:
        """The item the next pop (of `level`, if given) returns; None when there is none."""
        level = self.next_level() if level is None else level
        if level is None or not self._queues[level]:
            return None
        return self._queues[level][0][0]

    def pop(self, level: Priority | None = None) -> tuple[T, Priority]:
        """The next item and its level (the next of `level`, if given, charged to that level as usual); IndexError
        when there is none."""
        level = self.next_level() if level is None else level
        if level is None or not self._queues[level]:
            raise IndexError("pop from an empty WeightedQueue")
        item, cost = self._queues[level].popleft()
        self._clock = max(self._clock, self._pass[level])
        self._pass[level] += cost / self.weights[level]
        self._length -= 1
        return item, level

    def best(self) -> Priority | None:
        """The highest level with anything queued."""
        return next((level for level in Priority if self._queues[level]), None)

    def clear(self) -> None:
        for queue in self._queues.values():
            queue.clear()
        self._length = 0
