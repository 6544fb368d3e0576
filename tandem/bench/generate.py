"""`tandem bench --api generate`: closed-loop Generate streams on a running gateway, one concurrency level at a time,
and what each stream saw (time to first token, inter-token latency, tokens/s).

Every request asks for exactly `max_new_tokens` greedy tokens (temperature 0, `ignore_eos`), so Tandem and the bare
model (bare_generation.py) do the same work and their tokens/s compare. The pure parts (`stream_timings`, the
summary) are what the unit tests check; `run_level` is the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from tandem.bench.load import percentile
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.generation.v1 import generation_pb2
from tandem.sdk.status import decode_rpc_error


@dataclass(frozen=True)
class StreamTimings:
    """What one stream's arrivals say: time to first token, and one inter-token latency per token after the
    first message (in seconds)."""

    ttft_s: float | None
    itl_s: list[float]
    tokens: int


def stream_timings(sent: float, arrivals: Sequence[tuple[float, int]]) -> StreamTimings:
    """Time to first token and inter-token latencies of one stream from its messages' arrival times.

    `arrivals` is (perf_counter time, token ids in the message) for every message of the stream, in order. Messages
    without tokens (text held back, a last message with only usage) are skipped. The time to first token runs from
    `sent` to the first message with at least one token. Every later message adds, for each of its n tokens, the gap
    since the previous message with tokens divided by n: a message of 3 tokens after 30 ms counts as 3 tokens of
    10 ms, so each token counts once whether the server sends tokens alone or a few together. Extra tokens of the
    first message have no gap to measure and add none.
    """
    with_tokens = [(t, n) for t, n in arrivals if n > 0]
    if not with_tokens:
        return StreamTimings(None, [], 0)
    itl: list[float] = []
    for (previous, _), (now, n) in itertools.pairwise(with_tokens):
        itl.extend([(now - previous) / n] * n)
    return StreamTimings(with_tokens[0][0] - sent, itl, sum(n for _, n in with_tokens))


@dataclass
class Level:
    """One concurrency level's results, filled in while the streams run."""

    concurrency: int
    model: str = ""
    max_new_tokens: int = 0
    seconds: float = 0.0
    tokens: int = 0  # every token received, finished streams or not
    requests: int = 0  # streams that ended with a finish reason
    short: int = 0  # finished streams with fewer tokens than max_new_tokens (should be none: ignore_eos)
    ttft_ms: list[float] = field(default_factory=list, repr=False)
    itl_ms: list[float] = field(default_factory=list, repr=False)
    latency_ms: list[float] = field(default_factory=list, repr=False)
    codes: Counter[str] = field(default_factory=Counter)
    prompt_tokens: dict[int, int] = field(default_factory=dict, repr=False)  # prompt index -> usage.prompt_tokens
    outputs: dict[int, list[int]] = field(default_factory=dict, repr=False)  # prompt index -> first answer's ids
    versions: set[str] = field(default_factory=set)  # the model versions that answered
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def record(self, sent: float, arrivals: Sequence[tuple[float, int]], ended: float, code: str) -> None:
        timings = stream_timings(sent, arrivals)
        self.tokens += timings.tokens
        self.codes[code] += 1
        if code != "OK":
            return
        self.requests += 1
        self.short += timings.tokens < self.max_new_tokens
        if timings.ttft_s is not None:
            self.ttft_ms.append(timings.ttft_s * 1000)
        self.itl_ms.extend(s * 1000 for s in timings.itl_s)
        self.latency_ms.append((ended - sent) * 1000)

    def summary(self) -> dict[str, Any]:
        return {
            "api": "generate",
            "model": self.model,
            "concurrency": self.concurrency,
            "max_new_tokens": self.max_new_tokens,
            "seconds": self.seconds,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
            "requests": self.requests,
            "short_answers": self.short,
            "codes": dict(self.codes),
            "errors": {code: n for code, n in self.codes.items() if code != "OK"},
            "ttft_p50_ms": percentile(self.ttft_ms, 50),
            "ttft_p99_ms": percentile(self.ttft_ms, 99),
            "itl_p50_ms": percentile(self.itl_ms, 50),
            "itl_p99_ms": percentile(self.itl_ms, 99),
            "latency_p50_ms": percentile(self.latency_ms, 50),
            "latency_p99_ms": percentile(self.latency_ms, 99),
            "served_versions": sorted(self.versions),
            "load_average": list(self.load_average),
        }


@dataclass(frozen=True)
class Connection:
    """How to reach the gateway."""

    target: str
    credentials: grpc.ChannelCredentials | None = None
    server_name: str | None = None
    api_key: str | None = None


def generate_request(model: str, prompt: str, max_new_tokens: int, chat: bool) -> gateway_pb2.GenerateRequest:
    """Greedy, exactly `max_new_tokens` tokens (EOS ignored); the prompt as is, or as one user message."""
    params = generation_pb2.GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    if chat:
        message = generation_pb2.ChatMessage(role="user", content=prompt)
        return gateway_pb2.GenerateRequest(model=model, messages=[message], params=params)
    return gateway_pb2.GenerateRequest(model=model, prompt=prompt, params=params)


def _channel(connection: Connection) -> grpc.aio.Channel:
    options: list[tuple[str, Any]] = []
    if connection.server_name:
        options.append(("grpc.ssl_target_name_override", connection.server_name))
    if connection.credentials is None:
        return grpc.aio.insecure_channel(connection.target, options=options)
    return grpc.aio.secure_channel(connection.target, connection.credentials, options=options)


async def warm_up(
    connection: Connection, model: str, prompt: str, chat: bool, channel: grpc.aio.Channel | None = None
) -> None:
    """One short Generate, so the first level pays for no connection or lazy set-up (on `channel` when given)."""
    async with contextlib.AsyncExitStack() as stack:
        if channel is None:
            channel = await stack.enter_async_context(_channel(connection))
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        metadata = (("x-api-key", connection.api_key),) if connection.api_key else None
        async for _ in stub.Generate(generate_request(model, prompt, 2, chat), timeout=300, metadata=metadata):
            pass


def open_channel(connection: Connection) -> grpc.aio.Channel:
    """A channel to the gateway, for callers that keep one open across several run_level calls."""
    return _channel(connection)


async def run_level(
    connection: Connection,
    prompts: Sequence[str],
    level: Level,
    requests: int,
    deadline_s: float,
    progress: Any,
    chat: bool = False,
    honor_retry_info: bool = True,
    channel: grpc.aio.Channel | None = None,
) -> None:
    """`level.concurrency` streams in flight, each caller sending its next Generate as soon as its last stream
    ended (after a refusal carrying RetryInfo, once the delay it asks for has passed). Request i takes
    prompts[i % len(prompts)], whatever caller sends it, so every level (and the bare model) sees the same mix.
    On `channel` when given (left open: an already connected channel adds no connection set-up to the first
    stream's time to first token), else on a channel of its own."""
    async with contextlib.AsyncExitStack() as stack:
        if channel is None:
            channel = await stack.enter_async_context(_channel(connection))
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        metadata = (("x-api-key", connection.api_key),) if connection.api_key else None
        counter = iter(range(requests))

        async def caller() -> None:
            for i in counter:
                index = i % len(prompts)
                request = generate_request(level.model, prompts[index], level.max_new_tokens, chat)
                arrivals: list[tuple[float, int]] = []
                ids: list[int] = []
                sent = time.perf_counter()
                try:
                    async for reply in stub.Generate(request, timeout=deadline_s, metadata=metadata):
                        arrivals.append((time.perf_counter(), len(reply.token_ids)))
                        ids.extend(reply.token_ids)
                        if reply.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED:
                            level.prompt_tokens.setdefault(index, reply.usage.prompt_tokens)
                            level.versions.add(reply.model_version)
                except grpc.aio.AioRpcError as exc:
                    level.record(sent, arrivals, time.perf_counter(), exc.code().name)
                    progress.update(1)
                    delay = decode_rpc_error(exc).retry_delay_s if honor_retry_info else None
                    if delay:  # a well-behaved client waits as long as the server asked before its next call
                        await asyncio.sleep(delay)
                    continue
                level.record(sent, arrivals, time.perf_counter(), "OK")
                level.outputs.setdefault(index, ids)
                progress.update(1)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(level.concurrency)))
        level.seconds = time.perf_counter() - t0


def _ratio(numerator: float, denominator: float | None) -> float:
    return numerator / denominator if denominator else float("nan")


def compare_with_bare(level: Level, bare: dict[str, Any]) -> dict[str, Any]:
    """A level's figures against the bare model's: tokens/s over one-at-a-time `generate()` and over batched
    `generate()` at a batch of the level's concurrency (levels below the smallest batch measured get NaN), time to
    first token and inter-token latency p50 minus the bare prefill and per-token times, and two checks that the
    work was the same: the server's prompt token counts equal the bare tokenizer's, and its answers to the prompts
    the bare model generated one at a time equal the bare answers."""
    result = level.summary()
    counts = bare["prompt_tokens"]
    answers = bare["answers"]
    compared = [i for i in level.outputs if i < len(answers)]
    return {
        "ratio_to_bare_single": _ratio(result["tokens_per_s"], bare["single_tokens_per_s"]),
        "ratio_to_bare_batched": _ratio(
            result["tokens_per_s"], bare["batched_tokens_per_s"].get(str(level.concurrency))
        ),
        "ratio_to_bare_continuous": _ratio(result["tokens_per_s"], bare.get("continuous_tokens_per_s")),
        "ttft_p50_minus_bare_prefill_ms": result["ttft_p50_ms"] - bare["prefill_ms"],
        "itl_p50_minus_bare_per_token_ms": result["itl_p50_ms"] - bare["per_token_ms"],
        "prompt_token_mismatches": sorted(i for i, n in level.prompt_tokens.items() if n != counts[i]),
        "answers_compared": len(compared),
        "answers_equal_to_bare": sum(level.outputs[i] == answers[i] for i in compared),
    }
