"""CPU time each process of a running `tandem serve` spends per Embed request (and the client's, and the wall time).

CPU seconds per request hardly move with the machine's background load, unlike latency and throughput, so on a busy
shared host they compare deployment shapes where a bench cannot: the pipeline's CPU beside the model's is what a
request costs on top of the model when cores are scarce. Linux only (reads /proc).

    .venv/bin/tandem serve --port 50061 &                 # note the PID of `tandem serve`
    .venv/bin/python scripts/cpu_per_request.py PID 127.0.0.1:50061 --requests 1500
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc


def children(pid: int) -> dict[int, str]:
    """The processes `tandem serve` started, by PID, named by role."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    roles: dict[int, str] = {}
    for line in filter(str.strip, out.splitlines()):
        child, args = line.split(None, 1)
        roles[int(child)] = "gateway" if "-m gateway" in args else args.split("services.", 1)[-1].split()[0]
    return roles


def cpu_seconds(pid: int) -> float:
    from pathlib import Path

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pid", type=int, help="PID of `tandem serve`")
    parser.add_argument("target", help="its gateway address")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--model", default="")
    parser.add_argument("--texts-per-request", type=int, default=1)
    opts = parser.parse_args()
    roles = children(opts.pid)
    stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(opts.target))

    def call(i: int) -> None:
        inputs = [f"a short search query number {i} {j}" for j in range(opts.texts_per_request)]
        stub.Embed(gateway_pb2.EmbedRequest(model=opts.model, inputs=inputs))

    for i in range(50):
        call(i)
    before = {pid: cpu_seconds(pid) for pid in roles}
    client, started = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(opts.concurrency) as pool:
        list(pool.map(call, range(opts.requests)))
    wall = time.perf_counter() - started
    total = 0.0
    for pid, role in sorted(roles.items(), key=lambda item: item[1]):
        us = (cpu_seconds(pid) - before[pid]) / opts.requests * 1e6
        total += us
        print(f"{role:12s} {us:7.0f} us CPU per request")
    client_us = (time.process_time() - client) / opts.requests * 1e6
    print(
        f"{'servers':12s} {total:7.0f} us CPU per request; client {client_us:.0f} us;"
        f" wall {wall / opts.requests * 1e3:.2f} ms per request at concurrency {opts.concurrency}"
    )


if __name__ == "__main__":
    main()
