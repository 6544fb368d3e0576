"""Ordered fan-out for streams: answers come as they complete, with a bound on work in flight; a failure ends the
stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.streams import in_completion_order


async def test_in_completion_order_bounds_work_in_flight() -> None:
    running = peak = 0
    gates = {i: asyncio.Event() for i in range(6)}

    async def items() -> AsyncIterator[int]:
        for i in range(6):
            yield i

    async def answer(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gates[i].wait()
        running -= 1
        return i

    async def release() -> None:
        for i in (1, 0, 3, 2, 5, 4):  # out of order
            await asyncio.sleep(0.01)
            gates[i].set()

    opener = asyncio.create_task(release())
    got = [x async for x in in_completion_order(items(), answer, limit=2)]
    await opener
    assert sorted(got) == list(range(6)) and peak == 2

    async def failing(i: int) -> int:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _ = [x async for x in in_completion_order(items(), failing, limit=2)]
