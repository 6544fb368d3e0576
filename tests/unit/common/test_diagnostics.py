"""services/common/diagnostics.py: SIGUSR1 writes every thread's stack and every asyncio task's chain of awaits to
stderr, and the process goes on. Run in a child process (the signal handlers are process-wide)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from services.common import diagnostics

CHILD = textwrap.dedent(
    """
    import asyncio, os, signal
    from services.common import diagnostics

    async def innermost(event):
        await event.wait()

    async def tokens(event):
        await innermost(event)
        yield "token"

    async def handler(event):
        async for _ in tokens(event):
            pass

    async def main():
        event = asyncio.Event()
        diagnostics.install(asyncio.get_running_loop())
        diagnostics.install(asyncio.get_running_loop())  # a second time changes nothing
        task = asyncio.create_task(handler(event), name="request-7")
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.sleep(0.2)
        event.set()
        await task
        print("still running")

    asyncio.run(main())
    """
)


def test_sigusr1_writes_threads_and_the_await_chain_of_every_task_and_the_process_goes_on() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "still running\n"
    err = done.stderr
    assert "Current thread" in err  # faulthandler's dump of the threads
    assert err.count("--- 2 asyncio tasks in pid ") == 1  # installed twice, dumped once
    task = err.split("Task 'request-7':\n", 1)[1].splitlines()
    # Through the async generator `async for` waits on, down to the future the innermost coroutine waits for.
    assert [line.rsplit(" in ", 1)[-1] for line in task[:4]] == ["handler", "tokens", "innermost", "wait"]
    assert task[4].startswith("  waiting on <Future pending")


def test_sigusr1_in_a_process_without_an_event_loop_writes_its_threads() -> None:
    child = "import os, signal, time\nfrom services.common import diagnostics\ndiagnostics.install()\n"
    child += "os.kill(os.getpid(), signal.SIGUSR1)\ntime.sleep(0.1)\nprint('still running')\n"
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "still running\n"
    assert "Current thread" in done.stderr and "asyncio tasks" not in done.stderr


def test_await_chain_of_a_plain_coroutine() -> None:
    async def leaf() -> None:
        return None

    coroutine = leaf()
    try:
        [step] = diagnostics.await_chain(coroutine)
        assert step.endswith(" in leaf") and __file__ in step
    finally:
        coroutine.close()
