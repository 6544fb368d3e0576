"""The floor under any Python gRPC server on this machine: CPU per unary call of a grpc.aio server whose Embed returns
an empty response at once (no interceptors, no work), against which the gateway's CPU per request compares
(scripts/cpu_per_request.py, docs/performance.md).

    .venv/bin/python scripts/grpc_floor.py --requests 4000 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc


class _Empty(gateway_pb2_grpc.GatewayServiceServicer):
    async def Embed(self, request: Any, context: Any) -> gateway_pb2.EmbedResponse:  # noqa: N802 (gRPC's name)
        return gateway_pb2.EmbedResponse()


async def _serve() -> None:
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(_Empty(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve())
        return 0
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            request = gateway_pb2.EmbedRequest(model="m", inputs=["hello there"])
            for _ in range(200):  # warm-up
                stub.Embed(request)
            before = _cpu_seconds(server.pid)
            started = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(lambda _: stub.Embed(request), range(args.requests)))
            wall = time.perf_counter() - started
            cpu = _cpu_seconds(server.pid) - before
        print(
            f"bare grpc.aio server: {1e6 * cpu / args.requests:.0f} us CPU per call;"
            f" {1e3 * wall / args.requests:.3f} ms per call at concurrency {args.concurrency}"
        )
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
