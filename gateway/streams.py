"""Bounded fan-out for streaming RPCs: many requests of one stream in flight, answered in request or completion order.

One implementation, `fan_out`, serves both protocols: the native EmbedStream answers in request order (`ordered`),
the Open Inference Protocol's ModelStreamInfer as answers finish (`in_completion_order`; clients match by id).

At most `window` requests of a stream are started and not yet answered. When the window is full the reader stops
reading, so HTTP/2 flow control pushes back on the sender; when the caller reads slowly, answers are not taken, the
window stays full and the same happens. Memory per stream is therefore bounded whatever the caller does. Ending the
stream (cancellation, or an error) cancels every request still in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from services.common import errors

Item = TypeVar("Item")
Answer = TypeVar("Answer")


@dataclass(frozen=True)
class _End:
    """No more items: they ran out (error None), or reading them failed."""

    error: BaseException | None = None


async def fan_out(
    items: AsyncIterator[Item],
    answer: Callable[[Item], Awaitable[Answer]],
    window: int,
    *,
    in_order: bool,
) -> AsyncGenerator[tuple[Item, asyncio.Future[Answer]], None]:
    """Starts `answer` for each item as it is read, at most `window` unanswered at a time, and yields each item with
    its finished answer (a done future: the result, or the exception `answer` raised), in item order when
    `in_order`, otherwise as the answers finish.

    An error reading the items is raised once every item read before it has been answered.
    """
    # In item order, an entry is queued when its answer starts (and waited for at the head of the queue); in
    # completion order, when its answer finishes.
    ready: asyncio.Queue[tuple[Item, asyncio.Future[Answer]] | _End] = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    running: set[asyncio.Future[Answer]] = set()

    def start(item: Item) -> None:
        task = asyncio.ensure_future(answer(item))
        running.add(task)
        if in_order:
            ready.put_nowait((item, task))
        else:
            task.add_done_callback(lambda done: ready.put_nowait((item, done)))

    async def read() -> None:
        try:
            async for item in items:
                await slots.acquire()
                start(item)
        except Exception as exc:
            ready.put_nowait(_End(exc))
        else:
            ready.put_nowait(_End())

    def on_reader_done(task: asyncio.Future[None]) -> None:
        # A reader cancelled from outside (the call went away) must not leave the answers waiting for it.
        if task.cancelled():
            ready.put_nowait(_End(asyncio.CancelledError()))

    reader = asyncio.ensure_future(read())
    reader.add_done_callback(on_reader_done)
    end: _End | None = None
    try:
        while end is None or running:
            entry = await ready.get()
            if isinstance(entry, _End):
                end = entry
                continue
            item, task = entry
            await asyncio.wait((task,))
            running.discard(task)
            slots.release()
            yield item, task
        if end.error is not None:
            raise end.error
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(reader, *running, return_exceptions=True)


async def ordered(
    requests: AsyncIterator[Item],
    handle: Callable[[Item], Awaitable[Answer]],
    window: int,
) -> AsyncIterator[tuple[Item, Answer | errors.TandemError]]:
    """Yields (request, result or domain error) in request order; unexpected errors end the stream."""
    async with contextlib.aclosing(fan_out(requests, handle, window, in_order=True)) as answers:
        async for request, done in answers:
            error = done.exception()
            yield request, error if isinstance(error, errors.TandemError) else done.result()


async def in_completion_order(
    items: AsyncIterator[Item], answer: Callable[[Item], Awaitable[Answer]], limit: int
) -> AsyncIterator[Answer]:
    """Yields the answers as they finish, at most `limit` unanswered at a time. `answer` should not raise: a failure
    ends the whole sequence."""
    async with contextlib.aclosing(fan_out(items, answer, limit, in_order=False)) as answers:
        async for _, done in answers:
            yield done.result()
