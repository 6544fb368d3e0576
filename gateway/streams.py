"""Bounded fan-out for streaming RPCs: many requests of one stream in flight, answered in request or completion order.

The native EmbedStream answers in request order (`fan_out`, `ordered`); the Open Inference Protocol's ModelStreamInfer
answers as answers come (`interleaved`; clients match by id), each request one or more times (a streamed generation
answers once per text delta).

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
) -> AsyncGenerator[tuple[Item, asyncio.Future[Answer]], None]:
    """Starts `answer` for each item as it is read, at most `window` unanswered at a time, and yields each item with
    its finished answer (a done future: the result, or the exception `answer` raised), in item order.

    An error reading the items is raised once every item read before it has been answered.
    """
    # An entry is queued when its answer starts, and waited for at the head of the queue.
    ready: asyncio.Queue[tuple[Item, asyncio.Future[Answer]] | _End] = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    running: set[asyncio.Future[Answer]] = set()

    def start(item: Item) -> None:
        task = asyncio.ensure_future(answer(item))
        running.add(task)
        ready.put_nowait((item, task))

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
) -> AsyncGenerator[tuple[Item, Answer | errors.TandemError], None]:
    """Yields (request, result or domain error) in request order; unexpected errors end the stream."""
    async with contextlib.aclosing(fan_out(requests, handle, window)) as answers:
        async for request, done in answers:
            error = done.exception()
            yield request, error if isinstance(error, errors.TandemError) else done.result()


async def interleaved(
    items: AsyncIterator[Item], answers: Callable[[Item], AsyncGenerator[Answer, None]], window: int
) -> AsyncGenerator[Answer, None]:
    """gateway.streams.in_completion_order for items answered several times (a streamed generation): starts
    `answers` for each item as it is read, at most `window` of them running, and yields their answers as they come.

    An item's next answer is produced only once its previous one was taken (once the sequence's next answer is
    asked for: with gRPC, once it was written), so a slow caller holds every item back and memory stays bounded; a
    full window stops the reading (HTTP/2 flow control pushes back on the sender). An error reading the items is
    raised once every item read before it is done. `answers` should not raise: a failure ends the whole sequence.
    Ending the sequence (the caller went away, or an error) closes every item's answers.
    """
    loop = asyncio.get_running_loop()
    ready: asyncio.Queue[tuple[Answer, asyncio.Future[None]] | asyncio.Future[None] | _End] = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    running: set[asyncio.Future[None]] = set()

    async def run(item: Item) -> None:
        async with contextlib.aclosing(answers(item)) as stream:
            async for answer in stream:
                taken: asyncio.Future[None] = loop.create_future()
                ready.put_nowait((answer, taken))
                await taken

    async def read() -> None:
        try:
            async for item in items:
                await slots.acquire()
                task = asyncio.ensure_future(run(item))
                running.add(task)
                task.add_done_callback(ready.put_nowait)
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
            elif isinstance(entry, asyncio.Future):
                running.discard(entry)
                slots.release()
                error = None if entry.cancelled() else entry.exception()
                if error is not None:
                    raise error
            else:
                answer, taken = entry
                yield answer
                if not taken.done():
                    taken.set_result(None)
        if end.error is not None:
            raise end.error
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(reader, *running, return_exceptions=True)
