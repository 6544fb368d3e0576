"""Many unary calls multiplexed on one long-lived gRPC stream (InferenceService.InferStream): both ends.

Why: on this project's 2-core machine a grpc.aio unary call over a Unix socket takes 0.40 ms at one caller, a
message each way on a stream already open 0.19 ms (scripts/stream_floor.py); the gateway's hop to the inference
stage is on every request's path, so a request saves the difference and both processes the CPU of a call's setup,
headers and trailers. The stream carries the request id, the time left and cancellations in its messages, and
each answer carries its status (a failed request never ends the stream) and the stage's timings.

`answer_each` is the stage's side, `Multiplexer` the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


class Keyed(Protocol):
    id: int
    cancel: bool


K = TypeVar("K", bound=Keyed)


async def answer_each(
    requests: AsyncIterator[K],
    answer: Callable[[K], Awaitable[Out]],
    refuse: Callable[[K], Out],
    draining: asyncio.Event,
) -> AsyncGenerator[Out, None]:
    """The stage's side of a multiplexed stream: each request answered by `answer` in a task of its own (so a slow
    one holds up none behind it), the answers yielded as they finish; a cancel message cancels its request's task.

    `answer` never raises (it turns a failure into an answer). Ends when the caller has ended its side and every
    request is answered. Once `draining` is set (the stage is shutting down), new requests get `refuse`'s answer and
    the stream ends as soon as those already running are answered, so that the caller opens a new one elsewhere.
    When the stream is cancelled (the caller went away), the requests still running are cancelled with it.
    """
    answers: asyncio.Queue[Out | None] = asyncio.Queue()
    running: dict[int, asyncio.Task[None]] = {}
    reading = True

    async def run(request: K) -> None:
        try:
            answers.put_nowait(await answer(request))
        except asyncio.CancelledError:  # a cancel message, or the stream went away: no answer
            pass
        finally:
            running.pop(request.id, None)
            # The last request out ends the stream once nothing more may come (answered or cancelled alike).
            if not running and (not reading or draining.is_set()):
                answers.put_nowait(None)

    async def read() -> None:
        nonlocal reading
        try:
            async for request in requests:
                if request.cancel:
                    task = running.pop(request.id, None)
                    if task is not None:
                        task.cancel()
                    continue
                if draining.is_set():
                    answers.put_nowait(refuse(request))
                    continue
                running[request.id] = asyncio.create_task(run(request))
        finally:
            reading = False
            if not running:
                answers.put_nowait(None)

    async def drained() -> None:
        await draining.wait()
        if not running:
            answers.put_nowait(None)

    reader = asyncio.create_task(read())
    watcher = asyncio.create_task(drained())
    try:
        while (result := await answers.get()) is not None:
            yield result
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()  # type: ignore[misc]
    finally:
        reader.cancel()
        watcher.cancel()
        for task in list(running.values()):
            task.cancel()
        await asyncio.gather(reader, watcher, *running.values(), return_exceptions=True)


class StreamBrokenError(Exception):
    """The stream ended or failed with requests unanswered: they never got an answer, so they may be sent again."""


class Multiplexer(Generic[In, Out]):
    """The caller's side of a multiplexed stream: `call(message)` sends a request and waits for its answer.

    One stream at a time, opened on first use and again after it breaks. It is also replaced every `rotate_s`
    seconds (the old one is half-closed and ends once its answers are in), so that it follows the stage's connection
    recycling (max_connection_age) instead of being cut by it. `open` starts the stream call (in a fresh context);
    `make_request(id, message)` and `make_cancel(id)` build the stream's messages; answers carry their request's id.
    """

    def __init__(
        self,
        open: Callable[[], Any],
        make_request: Callable[[int, In], Any],
        make_cancel: Callable[[int], Any],
        answer_id: Callable[[Out], int],
        rotate_s: float = 20.0,
    ) -> None:
        self._open = open
        self._make_request = make_request
        self._make_cancel = make_cancel
        self._answer_id = answer_id
        self.rotate_s = rotate_s
        self._ids = itertools.count(1)
        self._stream: _Stream[Out] | None = None
        self._closed = False
        self.opened = 0  # streams opened so far (the first, then one per break or rotation)

    def _current(self) -> _Stream[Out]:
        stream = self._stream
        if stream is not None and not stream.broken and time.monotonic() - stream.opened < self.rotate_s:
            return stream
        if self._closed:
            raise StreamBrokenError("closed")
        if stream is not None and not stream.broken:
            stream.retire()
        # In a context of its own: the stream and its reader outlive the request that happened to open it, and must
        # not log under its request id or write into its timing record.
        self._stream = stream = contextvars.Context().run(_Stream, self._open, self._answer_id)
        self.opened += 1
        return stream

    async def call(self, message: In) -> Out:
        """The answer to `message`. Raises StreamBrokenError when the stream failed before the answer came (the message
        may be sent again); cancelling the caller sends a cancel message for it."""
        stream = self._current()
        request_id = next(self._ids)
        waiter: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        stream.pending[request_id] = waiter
        try:
            await stream.write(self._make_request(request_id, message))
            return await waiter
        except asyncio.CancelledError:
            # (Awaiting it, the cancelled caller cancelled the waiter too; one with a result was answered already.)
            if not stream.broken and (waiter.cancelled() or not waiter.done()):
                stream.send_soon(self._make_cancel(request_id))
            raise
        finally:
            stream.pending.pop(request_id, None)

    async def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stream.reader


class _Stream(Generic[Out]):
    """One open stream: its call, the waiters of its unanswered requests, and the task that reads its answers."""

    def __init__(self, open: Callable[[], Any], answer_id: Callable[[Out], int]) -> None:
        self.call = open()
        self.opened = time.monotonic()
        self.pending: dict[int, asyncio.Future[Out]] = {}
        self.broken = False
        self._answer_id = answer_id
        self._lock = asyncio.Lock()  # one write at a time: grpc takes one send operation per call at once
        self._background: set[asyncio.Task[None]] = set()
        self.reader = asyncio.create_task(self._read())

    async def write(self, message: Any) -> None:
        async with self._lock:
            if self.broken:
                raise StreamBrokenError("the stream ended")
            try:
                await self.call.write(message)
            except Exception as exc:  # the stream failed or ended: its reader fails the waiters
                self.broken = True  # the next request opens a new stream, whether or not the reader has seen it yet
                raise StreamBrokenError(str(exc)) from None

    def send_soon(self, message: Any) -> None:
        task = asyncio.create_task(self._send_quietly(message))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_quietly(self, message: Any) -> None:
        with contextlib.suppress(StreamBrokenError):
            await self.write(message)

    def retire(self) -> None:
        """No new requests: half-close, so the stage ends the stream once it has answered the ones in flight."""
        self.broken = True
        task = asyncio.create_task(self._done_writing())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _done_writing(self) -> None:
        async with self._lock:
            with contextlib.suppress(Exception):
                await self.call.done_writing()

    async def _read(self) -> None:
        error: BaseException | None = None
        try:
            async for answer in self.call:
                waiter = self.pending.pop(self._answer_id(answer), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)
        except asyncio.CancelledError:
            error = StreamBrokenError("closed")
            raise
        except Exception as exc:  # grpc.aio.AioRpcError: the stage went away
            error = StreamBrokenError(f"{type(exc).__name__}: {exc}")
            log.debug("multiplexed stream failed: %s", exc)
        finally:
            self.broken = True
            for waiter in self.pending.values():
                if not waiter.done():
                    waiter.set_exception(error or StreamBrokenError("the stage ended the stream"))
            self.pending.clear()
