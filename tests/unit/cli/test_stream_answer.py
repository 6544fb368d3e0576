"""tandem/cli/generate.py stream_answer: Ctrl-C while an answer streams cancels the stream from a signal handler; no
KeyboardInterrupt is raised inside the stream's iteration (in the real client, gRPC's code: one landing just after
gRPC's channel took its lock leaves the channel hung, tandem/cli/generate.py)."""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

from tandem.cli.generate import stream_answer
from tandem.sdk import GenerationDelta


def delta(text: str, last: bool = False) -> GenerationDelta:
    return GenerationDelta(text=text, token_ids=[1], finish_reason="length" if last else None)


class InterruptedStream(Iterator[GenerationDelta]):
    """Two deltas, then a SIGINT to this process while "inside gRPC" (the second next()), which goes on working there
    for a while: it records a KeyboardInterrupt raised there, and ends once cancelled."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = False
        self.closed = False
        self.interrupted_inside = False

    def __next__(self) -> GenerationDelta:
        self.calls += 1
        if self.calls == 1:
            return delta("Once ")
        try:
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 2
            while not self.cancelled and time.monotonic() < deadline:
                sum(range(100))  # Python bytecode, where a pending signal's handler runs
        except KeyboardInterrupt:
            self.interrupted_inside = True
            raise
        if self.cancelled:
            raise StopIteration
        return delta("upon", last=True)

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def close(self) -> None:
        self.closed = True


class Client:
    def __init__(self, stream: InterruptedStream) -> None:
        self.stream = stream

    def generate(self, *args: Any, **kwargs: Any) -> InterruptedStream:
        return self.stream


def test_ctrl_c_while_streaming_cancels_the_stream_and_raises_nothing_inside_it() -> None:
    stream = InterruptedStream()
    out = io.StringIO()
    before = signal.getsignal(signal.SIGINT)
    answer = stream_answer(Client(stream), out, model="m", prompt="p", params={})  # type: ignore[arg-type]
    assert not stream.interrupted_inside
    assert stream.cancelled and stream.closed
    assert answer.interrupted and answer.text == "Once " and out.getvalue() == "Once "
    assert signal.getsignal(signal.SIGINT) is before  # the handler that was there is back
