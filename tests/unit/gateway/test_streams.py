"""Ordered fan-out for streams: answers come as they complete, with a bound on work in flight; a failure ends the
stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from gateway.streams import interleaved


async def test_interleaved_bounds_work_in_flight() -> None:
    running = peak = 0
    gates = {i: asyncio.Event() for i in range(6)}

    async def items() -> AsyncIterator[int]:
        for i in range(6):
            yield i

    async def answer(i: int) -> AsyncGenerator[int, None]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gates[i].wait()
        running -= 1
        yield i

    async def release() -> None:
        for i in (1, 0, 3, 2, 5, 4):  # out of order
            await asyncio.sleep(0.01)
            gates[i].set()

    opener = asyncio.create_task(release())
    got = [x async for x in interleaved(items(), answer, 2)]
    await opener
    assert sorted(got) == list(range(6)) and peak == 2

    async def failing(i: int) -> AsyncGenerator[int, None]:
        raise RuntimeError("boom")
        yield i

    with pytest.raises(RuntimeError, match="boom"):
        _ = [x async for x in interleaved(items(), failing, 2)]
