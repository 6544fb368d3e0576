"""Ordered, bounded concurrency for streaming RPCs: many requests in flight, answers in request order.

At most `window` requests are in flight per stream. When the window is full the reader stops reading, so
HTTP/2 flow control pushes back on the sender; when the caller reads slowly the writer blocks, the window fills
and the same happens. Memory per stream is therefore bounded whatever the caller does. Ending the stream
(cancellation, or an error) cancels every request still in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from services.common import errors

Request = TypeVar("Request")
Result = TypeVar("Result")


async def ordered(
    requests: AsyncIterator[Request],
    handle: Callable[[Request], Awaitable[Result]],
    window: int,
) -> AsyncIterator[tuple[Request, Result | errors.TandemError]]:
    """Yields (request, result or domain error) in request order; unexpected errors end the stream."""
    # None marks the end of the requests.
    pending: asyncio.Queue[tuple[Request, asyncio.Future[Result]] | None] = asyncio.Queue(maxsize=window)

    async def read() -> None:
        try:
            async for request in requests:
                task = asyncio.ensure_future(handle(request))
                try:
                    await pending.put((request, task))
                except BaseException:
                    task.cancel()
                    raise
        finally:
            # The end mark, also when reading failed so the writer can finish and report it; not when cancelled,
            # since then the writer is gone and nobody waits for it.
            if not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                await pending.put(None)

    reader = asyncio.ensure_future(read())
    try:
        while True:
            item = await pending.get()
            if item is None:
                break
            request, task = item
            try:
                result = await task
            except errors.TandemError as err:
                yield request, err
            else:
                yield request, result
        await reader  # surfaces an error of the request iterator itself
    finally:
        reader.cancel()
        while not pending.empty():
            left = pending.get_nowait()
            if left is not None:
                left[1].cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
