"""Normal-priority load (closed-loop callers of one short text, or of 32 texts) beside a trickle of high-priority
requests (one every PERIOD_S seconds; 0: none), against each target in turn: the crowd's texts/s and the trickle's p50.

    trickle.py NAME=HOST:PORT[,NAME=HOST:PORT...] CALLERS TEXTS_PER_REQUEST PERIOD_S SECONDS ROUNDS
"""

import asyncio
import json
import statistics
import sys
import time

import grpc

from tandem.bench.corpus import make_texts
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc

TEXTS = make_texts("short", 2048)


async def crowd(stub, n, per, until, out):
    i = 0
    while time.monotonic() < until:
        req = gateway_pb2.EmbedRequest(inputs=[TEXTS[(n * 131 + i * per + k) % len(TEXTS)] for k in range(per)])
        i += 1
        try:
            await stub.Embed(req, timeout=30)
            out[0] += per
        except grpc.aio.AioRpcError:
            out[1] += 1


async def trickle(stub, period, until, lat):
    while time.monotonic() < until:
        t = time.perf_counter()
        await stub.Embed(
            gateway_pb2.EmbedRequest(inputs=[TEXTS[len(lat) % 2048]]),
            metadata=(("x-tandem-priority", "high"),),
            timeout=30,
        )
        lat.append((time.perf_counter() - t) * 1000)
        await asyncio.sleep(max(0.0, period - (time.perf_counter() - t)))


async def one(target, n, per, period, seconds):
    ch = grpc.aio.insecure_channel(target)
    stub = gateway_pb2_grpc.GatewayServiceStub(ch)
    out = [0, 0]
    lat = []
    warm_until = time.monotonic() + 3
    await asyncio.gather(*(crowd(stub, i, per, warm_until, [0, 0]) for i in range(n)))
    start = time.monotonic()
    until = start + seconds
    tasks = [crowd(stub, i, per, until, out) for i in range(n)]
    if period > 0:
        tasks.append(trickle(stub, period, until, lat))
    await asyncio.gather(*tasks)
    el = time.monotonic() - start
    await ch.close()
    return {
        "texts_per_s": round(out[0] / el, 1),
        "errors": out[1],
        "high_n": len(lat),
        "high_p50": round(statistics.median(lat), 2) if lat else None,
    }


async def main():
    targets = dict(t.split("=") for t in sys.argv[1].split(","))
    n, per, period, seconds, rounds = (
        int(sys.argv[2]),
        int(sys.argv[3]),
        float(sys.argv[4]),
        float(sys.argv[5]),
        int(sys.argv[6]),
    )
    for r in range(rounds):
        for name, target in targets.items():
            res = await one(target, n, per, period, seconds)
            print(
                json.dumps(
                    {"round": r + 1, "target": name, "callers": n, "texts_per_request": per, "period_s": period, **res}
                ),
                flush=True,
            )


asyncio.run(main())
