"""The gateway's Infer calls multiplexed on one InferStream (gateway --inference-stream; services/common/multiplex.py).

The pipeline's own tests already run over the stream in test_in_process_stages (that stack is `tandem serve`'s
shape: inference on a Unix socket, stream on). Here: what only the stream has: one stream for many requests, each
counted as an Infer call, failures answered in the stream while it goes on, the time left and the request id
carried per message, cancellation reaching the stage, a stream that breaks (the stage went away) or is rotated,
and a stage that drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry

from gateway.clients import STREAM_REQUEST_ID, InferenceClient, uses_inference_stream
from services.common import tracing
from services.common.logging import request_id
from services.common.metrics import MetricsInterceptor, ServiceMetrics
from services.common.server import start_server
from services.inference.servicer import management_registrar
from services.inference.servicer import registrar as inference_registrar
from tandem.gateway.v1 import gateway_pb2
from tandem.inference.v1 import inference_pb2
from tests.fixtures import tiny_models
from tests.fuzz.support import REFERENCE_BATCH
from tests.harness import Stack, serve_stack
from tests.status import details_of

REGISTRIES: dict[str, CollectorRegistry] = {}
INFER = "/tandem.inference.v1.InferenceService/Infer"
INFER_STREAM = "/tandem.inference.v1.InferenceService/InferStream"


def measured(role: str) -> Sequence[grpc.aio.ServerInterceptor]:
    REGISTRIES[role] = CollectorRegistry()
    return [MetricsInterceptor(ServiceMetrics(role, registry=REGISTRIES[role]))]


def requests_counted(method: str, code: str = "OK") -> float:
    labels = {"service": "inference", "method": method, "code": code}
    return REGISTRIES["inference"].get_sample_value("tandem_requests_total", labels) or 0.0


@pytest.fixture(scope="module")
async def stack(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    home = tmp_path_factory.mktemp("home")
    async with serve_stack(
        served_repository,
        home,
        interceptors=measured,
        in_process=True,
        inference_listen=f"unix:{home}/inference.sock",
        inference_stream=True,
    ) as running:
        yield running


def client_of(stack: Stack) -> InferenceClient:
    inference = stack.pipeline.inference
    assert isinstance(inference, InferenceClient) and inference.streamed
    return inference


async def embed(stack: Stack, text: str, **kwargs: Any) -> gateway_pb2.EmbedResponse:
    return await stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=[text]), timeout=20, **kwargs)


class Held:
    """Stands in for the core's infer: each call waits until released (or is cancelled), so a test can act while
    requests are in the stage. Records the request id each call ran under and whether it was cancelled."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.request_ids: list[str] = []

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.request_ids.append(request_id.get())
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return await self.real(*args, **kwargs)


@pytest.fixture
def held(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Held:
    hold = Held(stack.core.infer)
    monkeypatch.setattr(stack.core, "infer", hold)
    return hold


def test_the_stream_is_used_on_unix_sockets_while_tracing_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert uses_inference_stream("auto", "unix:/run/tandem/inference.sock")
    assert not uses_inference_stream("auto", "10.0.0.7:50053")
    assert not uses_inference_stream("auto", "dns:///inference:50053")
    assert uses_inference_stream("on", "dns:///inference:50053")
    assert not uses_inference_stream("off", "unix:/run/tandem/inference.sock")
    monkeypatch.setattr(tracing, "enabled", lambda: True)
    assert not uses_inference_stream("auto", "unix:/run/tandem/inference.sock")
    assert not uses_inference_stream("on", "unix:/run/tandem/inference.sock")


async def test_concurrent_requests_share_one_stream_and_each_counts_as_an_infer_call(stack: Stack) -> None:
    await embed(stack, "warm")  # the stream is open
    mux = client_of(stack).multiplexer
    opened, infer_before, streams_before = mux.opened, requests_counted(INFER), requests_counted(INFER_STREAM)
    texts = tiny_models.embedding_texts(n=24)
    replies = await asyncio.gather(*(embed(stack, t) for t in texts))
    alone = [await embed(stack, t) for t in texts[:4]]
    for reply, single in zip(replies[:4], alone, strict=True):  # each caller got its own rows
        assert reply.embeddings[0].values == pytest.approx(single.embeddings[0].values, abs=1e-5)
    assert mux.opened == opened  # no new stream
    # Each request is an Infer call in the stage's metrics (the coalescer may merge some callers into one run).
    assert 1 <= requests_counted(INFER) - infer_before <= len(texts) + 4
    assert requests_counted(INFER_STREAM) == streams_before  # the stream itself has not ended


async def test_a_failed_request_keeps_its_code_and_detail_and_the_stream_goes_on(stack: Stack) -> None:
    await embed(stack, "warm")
    mux = client_of(stack).multiplexer
    opened = mux.opened
    not_found_before = requests_counted(INFER, "NOT_FOUND")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed:9", inputs=["a"]), timeout=20)
    d = details_of(caught.value)
    assert (d.code, d.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert "tiny-embed" in d.message
    assert len((await embed(stack, "after the failure")).embeddings) == 1
    assert mux.opened == opened
    # Versions are resolved at the gateway first; a name the stage cannot serve is answered by the stage itself.
    assert requests_counted(INFER, "NOT_FOUND") >= not_found_before


async def test_the_stage_answers_each_message_in_the_stream_with_its_status_and_timings(stack: Stack) -> None:
    """The stage's side, called directly: a request past its deadline, one for a model that does not exist and a
    good one, on one stream; each answer carries its id; failures are serialized google.rpc.Status."""
    batch = REFERENCE_BATCH  # two sequences
    call = stack.inference.InferStream()
    await call.write(
        inference_pb2.InferStreamRequest(id=7, request=inference_pb2.InferRequest(model="nope", batch=batch))
    )
    await call.write(
        inference_pb2.InferStreamRequest(
            id=8, request=inference_pb2.InferRequest(model="tiny-embed", batch=batch), timeout_seconds=1e-9
        )
    )
    await call.write(
        inference_pb2.InferStreamRequest(
            id=9, request=inference_pb2.InferRequest(model="tiny-embed", batch=batch, pool=True), timeout_seconds=20
        )
    )
    await call.done_writing()
    answers = {answer.id: answer async for answer in call}
    assert await call.code() == grpc.StatusCode.OK
    assert set(answers) == {7, 8, 9}
    missing = status_pb2.Status.FromString(answers[7].status)
    assert (missing.code, "nope" in missing.message) == (grpc.StatusCode.NOT_FOUND.value[0], True)
    late = status_pb2.Status.FromString(answers[8].status)
    assert late.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "deadline" in late.message
    assert answers[9].HasField("response") and answers[9].response.pooled
    assert answers[9].response.output.shape[0] == 2
    assert {"queue", "compute"} <= set(answers[9].timings)


async def test_each_request_runs_under_its_callers_request_id(stack: Stack, held: Held) -> None:
    held.release.set()
    await embed(stack, "one", metadata=(("x-request-id", "caller-one"),))
    await embed(stack, "two", metadata=(("x-request-id", "caller-two"),))
    assert held.request_ids[-2:] == ["caller-one", "caller-two"]
    assert STREAM_REQUEST_ID not in held.request_ids


async def test_a_caller_that_goes_away_cancels_its_request_in_the_stage(stack: Stack, held: Held) -> None:
    """The gateway's stage call is cancelled: a cancel message takes the request out of the stage, and the stream
    goes on."""
    held.release.set()
    await embed(stack, "warm")
    held.release.clear()
    held.entered.clear()
    request = inference_pb2.InferRequest(model="tiny-embed", batch=REFERENCE_BATCH, pool=True)
    leaving = asyncio.ensure_future(client_of(stack).infer(request, time.monotonic() + 20))
    await asyncio.wait_for(held.entered.wait(), 10)
    leaving.cancel()
    await asyncio.wait_for(held.cancelled.wait(), 10)  # the cancel message reached the stage's request
    held.release.set()
    assert len((await embed(stack, "the stream goes on")).embeddings) == 1


async def test_a_public_caller_that_leaves_cancels_its_request_in_the_stage(stack: Stack, held: Held) -> None:
    """End to end: the caller cancels its Embed; its run at the gateway had no other caller, so the run stops and
    the stage's request with it."""
    held.release.set()
    await embed(stack, "warm")
    held.release.clear()
    held.entered.clear()
    call = stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["leaving"]), timeout=20)
    await asyncio.wait_for(held.entered.wait(), 10)
    call.cancel()
    await asyncio.wait_for(held.cancelled.wait(), 10)
    held.release.set()
    assert len((await embed(stack, "the stream goes on")).embeddings) == 1


async def test_a_stage_that_goes_away_fails_unavailable_and_the_next_call_opens_a_new_stream(
    stack: Stack, held: Held
) -> None:
    mux = client_of(stack).multiplexer
    held.release.set()
    await embed(stack, "warm")
    opened = mux.opened
    held.release.clear()
    held.entered.clear()
    in_flight = asyncio.ensure_future(embed(stack, "cut off"))
    await asyncio.wait_for(held.entered.wait(), 10)
    server = stack.stages["inference"]
    await server.stop(0)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await in_flight
        d = details_of(caught.value)
        assert (d.code, d.reason) == (grpc.StatusCode.UNAVAILABLE, "STAGE_UNAVAILABLE")
        assert "inference" in d.message
    finally:
        stack.stages["inference"] = await start_server(
            server.address,
            [inference_registrar(stack.core), management_registrar(stack.core)],
            interceptors=measured("inference"),
        )
    held.release.set()
    reply = await embed(stack, "back")
    assert len(reply.embeddings) == 1
    assert mux.opened > opened


async def test_streams_rotate_without_losing_a_request(stack: Stack) -> None:
    mux = client_of(stack).multiplexer
    rotate_s, mux.rotate_s = mux.rotate_s, 0.0  # every request opens a new stream and retires the last one
    try:
        opened = mux.opened
        texts = tiny_models.embedding_texts(n=16)
        replies = await asyncio.gather(*(embed(stack, t) for t in texts))
        assert all(len(r.embeddings) == 1 for r in replies)
        assert mux.opened > opened
    finally:
        mux.rotate_s = rotate_s


async def test_a_draining_stage_finishes_what_it_took_refuses_the_rest_and_ends_the_stream(
    stack: Stack, held: Held
) -> None:
    held.release.set()
    await embed(stack, "warm")
    held.release.clear()
    held.entered.clear()
    taken = asyncio.ensure_future(embed(stack, "taken before draining"))
    await asyncio.wait_for(held.entered.wait(), 10)
    stack.core.drain()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await embed(stack, "sent while draining")
        d = details_of(caught.value)
        assert (d.code, d.reason) == (grpc.StatusCode.UNAVAILABLE, "STAGE_UNAVAILABLE")
        assert "shutting down" in d.message
        held.release.set()
        assert len((await taken).embeddings) == 1
    finally:
        stack.core.draining.clear()
        held.release.set()
        with contextlib.suppress(Exception):
            await taken
    assert len((await embed(stack, "after draining")).embeddings) == 1
