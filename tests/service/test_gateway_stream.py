"""EmbedStream: order, per-request errors, bounded in-flight work against a slow reader, and cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from gateway.core import Pipeline
from gateway.servicer import registrar
from services.common.server import start_server
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.fixtures import tiny_models
from tests.harness import Stack


def request(i: int, texts: list[str]) -> gateway_pb2.EmbedStreamRequest:
    return gateway_pb2.EmbedStreamRequest(
        id=f"r{i}", request=gateway_pb2.EmbedRequest(model="tiny-embed", inputs=texts)
    )


async def test_responses_come_back_in_order_and_equal_unary(stack: Stack) -> None:
    texts = tiny_models.embedding_texts(seed=21, n=80)
    requests = [request(i, [t]) for i, t in enumerate(texts)]
    responses = [r async for r in stack.stub.EmbedStream(iter(requests))]
    assert [r.id for r in responses] == [r.id for r in requests]
    unary = await stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=texts))
    streamed = np.array([r.response.embeddings[0].values for r in responses])
    assert np.allclose(streamed, np.array([e.values for e in unary.embeddings]), atol=1e-5)


async def test_a_failed_request_does_not_end_the_stream(stack: Stack) -> None:
    requests = [request(0, ["good"]), request(1, []), request(2, ["fine"])]
    requests.insert(
        2,
        gateway_pb2.EmbedStreamRequest(
            id="wrong-task", request=gateway_pb2.EmbedRequest(model="tiny-ner", inputs=["x"])
        ),
    )
    responses = [r async for r in stack.stub.EmbedStream(iter(requests))]
    assert [r.id for r in responses] == ["r0", "r1", "wrong-task", "r2"]
    assert responses[0].HasField("response") and responses[3].HasField("response")
    bad = responses[1].error
    assert (bad.code, bad.reason, list(bad.fields)) == (
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        "INVALID_INPUT",
        ["inputs"],
    )
    assert "at least one entry" in bad.message
    assert (responses[2].error.reason, list(responses[2].error.fields)) == ("WRONG_TASK", ["model"])


class CountingPipeline:
    """Wraps the pipeline to record how many embed calls are in flight at once."""

    def __init__(self, inner: Pipeline) -> None:
        self.inner = inner
        self.now = 0
        self.peak = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def embed(self, *args: Any, **options: Any) -> Any:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            return await self.inner.embed(*args, **options)
        finally:
            self.now -= 1


async def test_a_slow_reader_keeps_in_flight_work_bounded(stack: Stack) -> None:
    counting = CountingPipeline(stack.pipeline)
    server = await start_server("127.0.0.1:0", [registrar(counting, stream_window=4)])  # type: ignore[arg-type]
    sent = 0

    async def produce() -> AsyncIterator[gateway_pb2.EmbedStreamRequest]:
        nonlocal sent
        for i in range(60):
            sent += 1
            yield request(i, ["good"])

    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = gateway_pb2_grpc.GatewayServiceStub(channel).EmbedStream(produce())
            got = []
            async for response in call:
                got.append(response.id)
                await asyncio.sleep(0.02)  # a slow reader
            assert got == [f"r{i}" for i in range(60)]
        # The window (4 queued), the one being answered, and the one waiting to be queued: never all 60.
        assert counting.peak <= 6
    finally:
        await server.stop(0)


async def test_cancelling_the_stream_cancels_its_pending_work(stack: Stack) -> None:
    counting = CountingPipeline(stack.pipeline)
    server = await start_server("127.0.0.1:0", [registrar(counting, stream_window=8)])  # type: ignore[arg-type]

    async def forever() -> AsyncIterator[gateway_pb2.EmbedStreamRequest]:
        i = 0
        while True:
            yield request(i, tiny_models.embedding_texts(seed=i, n=4))
            i += 1
            await asyncio.sleep(0)

    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = gateway_pb2_grpc.GatewayServiceStub(channel).EmbedStream(forever())
            async for _ in call:
                break
            call.cancel()
            for _ in range(100):
                if counting.now == 0:
                    break
                await asyncio.sleep(0.02)
            assert counting.now == 0
            # The gateway still answers.
            reply = await gateway_pb2_grpc.GatewayServiceStub(channel).Embed(
                gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["good"])
            )
            assert len(reply.embeddings) == 1
    finally:
        await server.stop(0)
