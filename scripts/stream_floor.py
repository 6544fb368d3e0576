"""What a hop costs in grpc.aio alone, one caller at a time over a Unix socket: a unary call against one message each
way on a bidirectional stream already open (echo servers, no interceptors, no work). Why the gateway multiplexes its
Infer calls on one InferStream (services/common/multiplex.py, docs/performance.md).

    .venv/bin/python scripts/stream_floor.py --calls 1500 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc


def _same(raw: bytes) -> bytes:
    return raw


async def _unary(request: bytes, context: Any) -> bytes:
    return request


async def _bidi(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def serve(address: str) -> None:
    server = grpc.aio.server()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary, _same, _same),
        "Stream": grpc.stream_stream_rpc_method_handler(_bidi, _same, _same),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Echo", handlers),))
    server.add_insecure_port(address)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def measure(address: str, calls: int, rounds: int, size: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        unary = channel.unary_unary("/floor.Echo/Unary", _same, _same)
        stream = channel.stream_stream("/floor.Echo/Stream", _same, _same)
        message = os.urandom(size)
        warm = calls // 8
        for round_ in range(1, rounds + 1):
            latencies = []
            for _ in range(calls):
                start = time.perf_counter()
                await unary(message, metadata=(("x-request-id", "floor"),))
                latencies.append(time.perf_counter() - start)
                await asyncio.sleep(0.001)
            unary_us = statistics.median(latencies[warm:]) * 1e6
            call = stream()
            latencies = []
            for _ in range(calls):
                start = time.perf_counter()
                await call.write(message)
                await call.read()
                latencies.append(time.perf_counter() - start)
                await asyncio.sleep(0.001)
            await call.done_writing()
            stream_us = statistics.median(latencies[warm:]) * 1e6
            print(f"round {round_}: unary call p50 {unary_us:.0f} us, stream message each way p50 {stream_us:.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bytes", type=int, default=1536, help="message size (about one pooled embedding)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.serve:
        asyncio.run(serve(opts.serve))
        return
    with tempfile.TemporaryDirectory() as tmp:
        address = f"unix:{Path(tmp) / 'floor.sock'}"
        server = subprocess.Popen([sys.executable, __file__, "--serve", address], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            asyncio.run(measure(address, opts.calls, opts.rounds, opts.bytes))
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
