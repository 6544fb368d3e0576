"""Priority under load, against a running gateway: high-priority latency alone, then beside a low-priority crowd.

Three phases, closed loop, one short text a request (tandem bench's 'short' corpus):
  unloaded   the high-priority callers alone;
  priority   the same callers (x-tandem-priority: high) beside --low callers (x-tandem-priority: low) that keep the
             server overloaded;
  no-priority (unless --skip-control) the same crowd with no priority asked for, for comparison.
The crowd honours RetryInfo as the SDK does (a refused caller waits the delay the server asked for, then asks again);
high-priority callers never retry, so every refusal they get is counted. Each class runs in a process of its own, so
the crowd's client work does not delay the high callers' event loop (both still share the machine with the server);
each reports the CPU its process used (`client_cpu_cores`: CPU seconds per second of its run). The high callers'
answers' x-tandem-timing trailers give the median time of each stage (`total` is the gateway's handler: the rest of
the latency is outside it). Writes one JSON and prints each phase as it ends.

On one host the crowd's 256 callers burn a good part of a core that, deployed, would be on other machines;
`--crowd-nice N` starts the crowd's process at nice N, so that the scheduler serves the server and the high-priority
callers before it (the result records the setting).

    .venv/bin/tandem serve --no-chat-model --gateway-args="--coalesce-max-queued 64"    # in one terminal
    .venv/bin/python scripts/priority_bench.py --out result.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tandem.bench.corpus import make_texts
from tandem.bench.load import percentile
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.sdk.status import decode_rpc_error

PRIORITY_HEADER = "x-tandem-priority"


@dataclass
class Callers:
    """What one class of callers saw in a phase."""

    latencies_ms: list[float] = field(default_factory=list)
    refusals: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    per_caller: list[int] = field(default_factory=list)  # answers each caller got
    refusals_per_caller: list[int] = field(default_factory=list)  # refusals each caller got, in the same order
    # Milliseconds per stage from each answer's x-tandem-timing trailer (total: the gateway's handler).
    stages: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def summary(self, seconds: float) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "answered": len(lat),
            "callers_answered": sum(1 for n in self.per_caller if n),
            "fewest_answers_of_a_caller": min(self.per_caller, default=0),
            "answers_of_a_caller_p10_p50": [
                round(percentile(self.per_caller, 10), 1) if self.per_caller else None,
                round(percentile(self.per_caller, 50), 1) if self.per_caller else None,
            ],
            # The refusals of each caller that got no answer at all: few means it waited (for a call or a RetryInfo
            # delay) the whole phase, many that it was turned away every time.
            "refusals_of_unanswered_callers": sorted(
                r for n, r in zip(self.per_caller, self.refusals_per_caller, strict=True) if not n
            ),
            "answers_per_s": round(len(lat) / seconds, 1),
            "refused": self.refusals,
            "other_errors": dict(self.errors),
            "p50_ms": round(percentile(lat, 50), 2) if lat else None,
            "p90_ms": round(percentile(lat, 90), 2) if lat else None,
            "p99_ms": round(percentile(lat, 99), 2) if lat else None,
            "mean_ms": round(statistics.fmean(lat), 2) if lat else None,
            "stage_p50_ms": {name: round(statistics.median(ms), 2) for name, ms in self.stages.items()},
        }


async def caller(
    stub: gateway_pb2_grpc.GatewayServiceAsyncStub,
    model: str,
    texts: list[str],
    level: str | None,
    until: float,
    seen: Callers,
    retry: bool,
    offset: int,
) -> None:
    metadata = ((PRIORITY_HEADER, level),) if level else ()
    n = offset
    answered = refused = 0
    while time.monotonic() < until:
        request = gateway_pb2.EmbedRequest(model=model, inputs=[texts[n % len(texts)]])
        n += 1
        started = time.perf_counter()
        try:
            call = stub.Embed(request, metadata=metadata, timeout=30)
            await call
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                seen.refusals += 1
                refused += 1
                delay = decode_rpc_error(err).retry_delay_s or 0.05
                if retry:
                    await asyncio.sleep(min(delay, max(0.0, until - time.monotonic())))
                continue
            seen.errors[err.code().name] += 1
            continue
        seen.latencies_ms.append((time.perf_counter() - started) * 1000)
        answered += 1
        for key, value in await call.trailing_metadata() or ():
            if key == "x-tandem-timing":
                for item in str(value).split(","):
                    name, _, ms = item.strip().partition("=")
                    seen.stages[name].append(float(ms.removesuffix("ms")))
    seen.per_caller.append(answered)
    seen.refusals_per_caller.append(refused)


async def callers(
    target: str,
    model: str,
    texts: list[str],
    count: int,
    level: str | None,
    warmup_s: float,
    seconds: float,
    retry: bool,
    channels: int,
) -> dict[str, Any]:
    """`count` closed-loop callers for warmup_s (not counted), then `seconds`: what they saw."""
    opened = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    try:
        stubs = [gateway_pb2_grpc.GatewayServiceStub(c) for c in opened]
        start = time.monotonic()
        warm = Callers()
        await asyncio.gather(
            *(caller(stubs[i % channels], model, texts, level, start + warmup_s, warm, retry, i) for i in range(count))
        )
        seen = Callers()
        measured = time.monotonic()
        await asyncio.gather(
            *(
                caller(stubs[i % channels], model, texts, level, measured + seconds, seen, retry, 5000 + 7 * i)
                for i in range(count)
            )
        )
        return seen.summary(time.monotonic() - measured)
    finally:
        for channel in opened:
            await channel.close()


async def phase(
    args: argparse.Namespace, texts: list[str], low: int, low_level: str | None, high_level: str | None, seconds: float
) -> dict[str, Any]:
    """The high-priority callers and `low` low-priority callers, each in a child process, over the same seconds."""

    async def spawn(role: str, count: int, level: str | None, run_s: float, nice: int) -> Any:
        command = [sys.executable, __file__, "--role", role, "--target", args.target, "--model", args.model]
        command += [f"--{role}", str(count), "--warmup-s", str(args.warmup_s), "--loaded-s", str(run_s)]
        if level:
            command += ["--level", level]
        return await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, preexec_fn=(lambda: os.nice(nice)) if nice else None
        )

    # The crowd starts first and runs a little past the high callers' end, so they never see it thin out.
    children = {"low": await spawn("low", low, low_level, seconds + 2.0, args.crowd_nice)} if low else {}
    children["high"] = await spawn("high", args.high, high_level, seconds, 0)
    result: dict[str, Any] = {"seconds": seconds}
    for role, child in children.items():
        out, _ = await child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"the {role}-priority callers failed ({child.returncode})")
        result[role] = json.loads(out)
    return {"seconds": seconds, **{role: result[role] for role in ("high", "low") if role in result}}


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="the gateway")
    parser.add_argument("--model", default="", help="model to embed with (default: the gateway's default)")
    parser.add_argument("--high", type=int, default=4, help="high-priority callers")
    parser.add_argument("--low", type=int, default=256, help="low-priority callers (the crowd)")
    parser.add_argument("--unloaded-s", type=float, default=15.0, help="seconds of the unloaded phase")
    parser.add_argument("--loaded-s", type=float, default=40.0, help="seconds of each loaded phase")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="seconds before each phase is counted")
    parser.add_argument("--skip-control", action="store_true", help="no phase without priorities")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    parser.add_argument(
        "--crowd-nice", type=int, default=0, help="nice value of the crowd's process (0: as the rest; 19: last)"
    )
    parser.add_argument("--role", choices=["all", "high", "low"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--level", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    texts = make_texts("short", 2048)
    if args.role != "all":  # a child: one class of callers, their summary on stdout
        started = time.monotonic()
        high = args.role == "high"  # high-priority callers never retry and share one channel; the crowd uses four
        count = args.high if high else args.low
        seen = await callers(
            args.target, args.model, texts, count, args.level, args.warmup_s, args.loaded_s, not high, 1 if high else 4
        )
        usage = resource.getrusage(resource.RUSAGE_SELF)
        seen["client_cpu_cores"] = round((usage.ru_utime + usage.ru_stime) / (time.monotonic() - started), 3)
        print(json.dumps(seen))
        return 0
    phases: dict[str, Any] = {}
    runs: list[tuple[str, int, str | None, str | None, float]] = [
        ("unloaded", 0, None, "high", args.unloaded_s),
        ("priority", args.low, "low", "high", args.loaded_s),
    ]
    if not args.skip_control:
        runs.append(("no-priority", args.low, None, None, args.loaded_s))
    for name, low, low_level, high_level, seconds in runs:
        print(
            f"{name}: {args.high} callers ({high_level or 'no priority'}) beside {low} ({low_level or 'no priority'})"
            f" for {seconds:g} s",
            file=sys.stderr,
        )
        phases[name] = await phase(args, texts, low, low_level, high_level, seconds)
        print(json.dumps(phases[name]), file=sys.stderr)
    unloaded = phases["unloaded"]["high"]["p50_ms"]
    loaded = phases["priority"]["high"]["p50_ms"]
    result = {
        "command": "scripts/priority_bench.py " + " ".join(argv),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "callers": {"high": args.high, "low": args.low, "crowd_nice": args.crowd_nice},
        "phases": phases,
        "high_p50_loaded_over_unloaded": round(loaded / unloaded, 2) if unloaded and loaded else None,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
