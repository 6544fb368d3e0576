"""Which asyncio event loop a service runs on: uvloop where it is installed (`--event-loop auto`, the default), or
asyncio's own.

Why: every call through a service is a chain of event-loop turns (grpc.aio's completion-queue poller wakes the loop
through a file descriptor, handlers await stage calls, model threads hand results back with call_soon_threadsafe),
and uvloop's turns and thread wake-ups cost less than asyncio's selector loop. `tandem bench`, one caller of one short
text against two servers side by side (light stages in the gateway's process), three paired runs of 5 to 9 rounds:
p50 lower by 0.02, 0.10 and 0.10 ms with uvloop, won in 8 of 9 rounds of the longest run; throughput at 32 callers
unchanged within the noise (docs/performance.md). grpc.aio runs on any loop that implements add_reader; uvloop does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal

EventLoop = Literal["auto", "uvloop", "asyncio"]


class EventLoopUnavailableError(RuntimeError):
    """--event-loop uvloop where uvloop is not installed."""


def loop_factory(choice: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the loop for `choice`; None for asyncio's default loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise EventLoopUnavailableError(
                "--event-loop uvloop: uvloop is not installed (pip install uvloop, or --event-loop auto)"
            ) from None
        return None
    return uvloop.new_event_loop


def name(choice: EventLoop) -> str:
    """The loop `choice` runs on: "uvloop" or "asyncio"."""
    return "asyncio" if loop_factory(choice) is None else "uvloop"


def run(main: Coroutine[Any, Any, None], choice: EventLoop) -> None:
    """asyncio.run(main) on the loop `choice` names."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        runner.run(main)
