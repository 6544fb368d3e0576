"""What a stuck process is doing: on SIGUSR1, every thread's stack and, where an event loop runs, every asyncio task's
chain of awaits, written to stderr. The process goes on running.

`kill -USR1 PID` on a stage, the gateway or a `tandem` command. The threads come from faulthandler, at signal time
from C, so they are written even when the event loop is blocked; the tasks come on the loop's next turn (a blocked
loop writes none, which itself says where to look). A task's chain is followed through every coroutine and async
generator it awaits, down to the future it waits on: which stage call a request waits for, not only its handler's
first line (asyncio's own Task.print_stack shows one frame of a suspended coroutine).
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, TextIO

DUMP_SIGNAL = signal.SIGUSR1
_installed: set[int] = set()  # ids of the loops whose tasks are dumped (0: threads only)


def install(loop: asyncio.AbstractEventLoop | None = None, out: TextIO | None = None) -> None:
    """Dumps on SIGUSR1 from now on: threads always, and `loop`'s tasks when given (a loop running on the main
    thread). Signals reach only the main thread: from any other (a stage served inside a test's thread) this does
    nothing. Calling it again for the same loop changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    key = 0 if loop is None else id(loop)
    if key in _installed:
        return
    _installed.add(key)
    stream = out or sys.stderr
    if loop is not None:
        loop.add_signal_handler(DUMP_SIGNAL, dump_tasks, loop, stream)
    # Registered last, chaining to the loop's handler: faulthandler writes the threads from the signal handler itself.
    faulthandler.register(DUMP_SIGNAL, file=stream, all_threads=True, chain=loop is not None)


def dump_tasks(loop: asyncio.AbstractEventLoop, out: TextIO) -> None:
    tasks = sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name())
    # Several processes may share one stderr (tandem serve's): say whose tasks these are.
    lines = [f"--- {len(tasks)} asyncio tasks in pid {os.getpid()} ({sys.argv[0]})"]
    for task in tasks:
        lines.append(f"Task {task.get_name()!r}:")
        lines.extend(f"  {step}" for step in await_chain(task.get_coro()))
    out.write("\n".join(lines) + "\n")
    out.flush()


def await_chain(awaitable: Any) -> list[str]:
    """`file:line in function` for each coroutine, async generator or generator down the chain of awaits, then what
    the innermost one waits on."""
    steps: list[str] = []
    seen: set[int] = set()
    current = awaitable
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frame, inner = _frame_and_inner(current)
        if frame is None and inner is None:
            if current is not awaitable:
                steps.append(f"waiting on {_describe(current)}")
            break
        if frame is not None:
            steps.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        current = inner
    return steps


def _frame_and_inner(obj: Any) -> tuple[FrameType | None, Any]:
    for frame_attr, inner_attr in (("cr_frame", "cr_await"), ("ag_frame", "ag_await"), ("gi_frame", "gi_yieldfrom")):
        if hasattr(obj, frame_attr):
            return getattr(obj, frame_attr), getattr(obj, inner_attr, None)
    # What `async for` and `await future` leave in the chain name no attribute for what they wrap: an async
    # generator's __anext__ object holds the generator, a future's iterator the future.
    if type(obj).__name__ in _WRAPPERS:
        for inner in gc.get_referents(obj):
            if hasattr(inner, "ag_frame") or isinstance(inner, asyncio.Future):
                return None, inner
    return None, None


_WRAPPERS = {"async_generator_asend", "async_generator_athrow", "FutureIter"}


def _describe(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 200 else text[:197] + "..."


__all__ = ["DUMP_SIGNAL", "await_chain", "dump_tasks", "install"]
