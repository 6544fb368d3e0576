"""The stage's side of a multiplexed stream (services.common.multiplex.answer_each), without gRPC: requests from a
queue the test feeds, answers as they come, cancellation, the end of the stream and draining."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.common.multiplex import answer_each


@dataclass
class Message:
    id: int
    cancel: bool = False


class Caller:
    """Feeds messages to the stream and reads its answers; `None` ends the caller's side."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[Message | None] = asyncio.Queue()
        self.gates: dict[int, asyncio.Event] = {}
        self.started: dict[int, asyncio.Event] = {}
        self.cancelled: set[int] = set()
        self.draining = asyncio.Event()

    async def requests(self) -> AsyncIterator[Message]:
        while (message := await self.outbox.get()) is not None:
            yield message

    async def answer(self, message: Message) -> str:
        self.started.setdefault(message.id, asyncio.Event()).set()
        try:
            await self.gates.setdefault(message.id, asyncio.Event()).wait()
        except asyncio.CancelledError:
            self.cancelled.add(message.id)
            raise
        return f"answer {message.id}"

    def gate(self, request: int) -> asyncio.Event:
        return self.gates.setdefault(request, asyncio.Event())

    async def until_started(self, request: int) -> None:
        await asyncio.wait_for(self.started.setdefault(request, asyncio.Event()).wait(), 5)

    def stream(self) -> AsyncIterator[str]:
        return answer_each(self.requests(), self.answer, lambda m: f"refused {m.id}", self.draining)


async def collect(stream: AsyncIterator[str]) -> list[str]:
    return [answer async for answer in stream]


async def test_answers_come_as_they_finish_and_the_stream_ends_after_the_last() -> None:
    caller = Caller()
    answers = asyncio.ensure_future(collect(caller.stream()))
    for request in (1, 2, 3):
        caller.outbox.put_nowait(Message(request))
    await caller.until_started(3)
    caller.outbox.put_nowait(None)  # the caller is done sending; three are still running
    for request in (2, 3, 1):
        caller.gate(request).set()
        await asyncio.sleep(0)
    assert await asyncio.wait_for(answers, 5) == ["answer 2", "answer 3", "answer 1"]


async def test_a_cancel_message_cancels_its_request_and_sends_no_answer() -> None:
    caller = Caller()
    answers = asyncio.ensure_future(collect(caller.stream()))
    caller.outbox.put_nowait(Message(1))
    caller.outbox.put_nowait(Message(2))
    await caller.until_started(2)
    caller.outbox.put_nowait(Message(1, cancel=True))
    caller.outbox.put_nowait(None)
    await asyncio.sleep(0.01)
    assert caller.cancelled == {1}
    caller.gate(2).set()
    assert await asyncio.wait_for(answers, 5) == ["answer 2"]


async def test_draining_refuses_new_requests_and_ends_once_the_last_running_one_is_gone() -> None:
    """Also when the last one is cancelled rather than answered (the caller left while the stage drained)."""
    caller = Caller()
    answers = asyncio.ensure_future(collect(caller.stream()))
    caller.outbox.put_nowait(Message(1))
    caller.outbox.put_nowait(Message(2))
    await caller.until_started(2)
    caller.draining.set()
    caller.outbox.put_nowait(Message(3))
    await asyncio.sleep(0.01)
    caller.gate(1).set()
    await asyncio.sleep(0.01)
    caller.outbox.put_nowait(Message(2, cancel=True))  # the caller's side stays open: draining ends the stream
    assert await asyncio.wait_for(answers, 5) == ["refused 3", "answer 1"]
    assert caller.cancelled == {2}


async def test_a_stream_that_goes_away_cancels_what_is_still_running() -> None:
    caller = Caller()
    stream = caller.stream()
    caller.outbox.put_nowait(Message(1))
    caller.outbox.put_nowait(Message(2))
    caller.gate(1).set()
    assert await asyncio.wait_for(anext(stream), 5) == "answer 1"
    await caller.until_started(2)
    await stream.aclose()  # type: ignore[attr-defined]
    assert caller.cancelled == {2}
