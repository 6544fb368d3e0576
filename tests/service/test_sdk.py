"""tandem.sdk: typed results against the in-process stack, and retries against a gateway that fails on purpose."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import status_pb2
from grpc_status import rpc_status

from services.common import errors
from services.common.errors import Reason
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.sdk import (
    NO_RETRY,
    AsyncTandemClient,
    RetryPolicy,
    TandemClient,
    TandemError,
)
from tests.fixtures import tiny_models
from tests.harness import Stack

# Against the real gateway over the tiny models: the client must return exactly what the wire carries.


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[AsyncTandemClient]:
    async with AsyncTandemClient(stack.gateway.address) as client:
        yield client


async def test_embed_returns_the_wire_values_as_float32(stack: Stack, client: AsyncTandemClient) -> None:
    texts = tiny_models.embedding_texts(n=5)
    vectors = await client.embed(texts, model="tiny-embed")
    raw = await stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=texts))
    assert vectors.dtype == np.float32 and vectors.shape == (5, len(raw.embeddings[0].values))
    assert np.array_equal(vectors, np.array([e.values for e in raw.embeddings], dtype=np.float32))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    raw_norms = np.linalg.norm(await client.embed(texts, model="tiny-embed", normalize=False), axis=1)
    assert not np.allclose(raw_norms, 1.0, atol=1e-3)


async def test_every_task_is_typed(stack: Stack, client: AsyncTandemClient) -> None:
    texts = [t for t, _ in tiny_models.classifier_examples(seed=7, n=4)]
    labels = await client.classify(texts, model="tiny-sentiment")
    raw = await stack.stub.Classify(gateway_pb2.ClassifyRequest(model="tiny-sentiment", inputs=texts))
    assert [[(x.label, x.score) for x in row] for row in labels] == [
        [(s.label, s.score) for s in r.labels] for r in raw.results
    ]
    assert {x.label for x in labels[0]} == set(tiny_models.SENTIMENT_LABELS)
    assert [len(row) for row in await client.classify(texts, model="tiny-sentiment", top_k=1)] == [1] * 4

    entities = (await client.classify_tokens(["anna lives in amsterdam"], model="tiny-ner"))[0]
    assert [(e.label, e.text) for e in entities] == [("PER", "anna"), ("LOC", "amsterdam")]
    assert [(e.start, e.end) for e in entities] == [(0, 4), (14, 23)]

    ranked = await client.rerank("x", ["a", "b", "c"], model="tiny-rerank", top_n=2, return_documents=True)
    assert len(ranked) == 2 and ranked[0].score >= ranked[1].score
    assert all(r.document == ["a", "b", "c"][r.index] for r in ranked)

    encoding = (await client.tokenize(["anna visited paris"], model="tiny-ner"))[0]
    assert encoding.special[0] and encoding.special[-1] and encoding.offsets[1] == (0, 4)
    assert await client.detokenize(encoding.ids, model="tiny-ner") == "anna visited paris"

    models = {m.name: m for m in await client.list_models()}
    assert (models["tiny-ner"].task, models["tiny-rerank"].task) == ("token-classification", "rerank")
    info = await client.get_model("tiny-embed")
    assert (info.task, info.ready, info.version) == ("embedding", True, "1") and info.embedding_dimension > 0


@pytest.mark.parametrize(
    ("kwargs", "code", "reason", "fields"),
    [
        ({"inputs": [], "model": "tiny-embed"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", ["inputs"]),
        ({"inputs": ["x"], "model": "missing"}, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", []),
        ({"inputs": ["x"], "model": "tiny-ner"}, grpc.StatusCode.INVALID_ARGUMENT, "WRONG_TASK", ["model"]),
    ],
)
async def test_errors_carry_code_reason_and_fields(
    client: AsyncTandemClient, kwargs: dict[str, Any], code: grpc.StatusCode, reason: str, fields: list[str]
) -> None:
    with pytest.raises(TandemError) as caught:
        await client.embed(**kwargs)
    error = caught.value
    assert (error.code, error.reason, error.domain, error.fields) == (code, reason, "tandem.dev", fields)
    assert error.message and all(v.description for v in error.field_violations)
    assert str(error).startswith(f"{code.name} ({reason}): ")


async def test_async_stream_keeps_order_and_per_request_errors(client: AsyncTandemClient) -> None:
    texts = tiny_models.embedding_texts(seed=3, n=6)

    async def requests() -> AsyncIterator[tuple[str, list[str]]]:
        for i, text in enumerate(texts):
            yield f"r{i}", [text]
            if i == 2:
                yield "empty", []

    results = [r async for r in client.embed_stream(requests(), model="tiny-embed")]
    assert [r.id for r in results] == ["r0", "r1", "r2", "empty", "r3", "r4", "r5"]
    bad = results[3]
    assert bad.embeddings is None and bad.error is not None
    assert (bad.error.code, bad.error.reason, bad.error.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
        ["inputs"],
    )
    streamed = np.concatenate([r.embeddings for r in results if r.embeddings is not None])
    assert np.allclose(streamed, await client.embed(texts, model="tiny-embed"), atol=1e-5)


async def test_sync_client(stack: Stack) -> None:
    def use() -> None:
        with TandemClient(stack.gateway.address) as client:
            texts = tiny_models.embedding_texts(seed=5, n=3)
            vectors = client.embed(texts, model="tiny-embed")
            assert vectors.shape[0] == 3 and vectors.dtype == np.float32
            streamed = list(client.embed_stream([(str(i), [t]) for i, t in enumerate(texts)], model="tiny-embed"))
            assert [r.id for r in streamed] == ["0", "1", "2"]
            assert np.allclose(np.concatenate([r.embeddings for r in streamed if r.embeddings is not None]), vectors)
            with pytest.raises(TandemError) as caught:
                client.classify(["x"], model="tiny-sentiment", top_k=-1)
            assert (caught.value.code, caught.value.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["top_k"])

    # The stack's servers share this event loop, so the blocking client runs in a thread.
    await asyncio.to_thread(use)


# Retries, against a gateway that answers Embed with a scripted list of failures, then succeeds.


class FlakyGateway(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self) -> None:
        self.failures: list[status_pb2.Status] = []
        self.hang_s = 0.0
        self.attempts: list[float] = []

    def Embed(self, request: gateway_pb2.EmbedRequest, context: grpc.ServicerContext) -> gateway_pb2.EmbedResponse:  # noqa: N802
        self.attempts.append(time.monotonic())
        if self.hang_s:
            threading.Event().wait(self.hang_s)
        if self.failures:
            context.abort_with_status(rpc_status.to_status(self.failures.pop(0)))
        return gateway_pb2.EmbedResponse(embeddings=[gateway_pb2.Embedding(values=[0.6, 0.8])], model="fake")

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.attempts, self.attempts[1:], strict=False)]


@pytest.fixture
def flaky() -> Iterator[tuple[FlakyGateway, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = FlakyGateway()
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def status(error: errors.TandemError) -> status_pb2.Status:
    """The exact status the real services send, from the project's one error table."""
    return error.to_status_proto()


@pytest.mark.parametrize(
    "failure",
    [
        errors.unavailable("model loading", retry_after_s=0.2),
        errors.resource_exhausted("queue full", retry_after_s=0.2),
    ],
    ids=["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
)
def test_retries_wait_as_long_as_retry_info_asks(flaky: tuple[FlakyGateway, str], failure: errors.TandemError) -> None:
    servicer, address = flaky
    servicer.failures = [status(failure), status(failure)]
    with TandemClient(address, timeout=10) as client:
        vectors = client.embed(["x"])
    assert vectors.tolist() == [[pytest.approx(0.6), pytest.approx(0.8)]]
    assert len(servicer.attempts) == 3
    assert min(servicer.gaps()) >= 0.2


def test_failures_without_retry_info_back_off(flaky: tuple[FlakyGateway, str]) -> None:
    servicer, address = flaky
    servicer.failures = [status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message="connection reset")]
    with TandemClient(address, retry=RetryPolicy(initial_backoff_s=0.01)) as client:
        client.embed(["x"])
    assert len(servicer.attempts) == 2


@pytest.mark.parametrize(
    "failure",
    [
        errors.invalid_argument("inputs must have at least one entry", "inputs"),
        errors.not_found("model 'missing' not found"),
        errors.deadline_exceeded("deadline passed in inference"),
        errors.failed_precondition("broken model", Reason.MODEL_BROKEN),
    ],
    ids=lambda e: e.code.name,
)
def test_other_codes_are_never_retried(flaky: tuple[FlakyGateway, str], failure: errors.TandemError) -> None:
    servicer, address = flaky
    servicer.failures = [status(failure)] * 3
    with TandemClient(address) as client, pytest.raises(TandemError) as caught:
        client.embed(["x"])
    assert len(servicer.attempts) == 1
    assert (caught.value.code, caught.value.reason, caught.value.message) == (
        failure.code,
        failure.reason,
        failure.message,
    )
    assert caught.value.fields == [v.field for v in failure.violations]


def test_gives_up_after_max_attempts_with_the_last_error(flaky: tuple[FlakyGateway, str]) -> None:
    servicer, address = flaky
    servicer.failures = [status(errors.unavailable("still loading", retry_after_s=0.01))] * 5
    with TandemClient(address, retry=RetryPolicy(max_attempts=3)) as client, pytest.raises(TandemError) as caught:
        client.embed(["x"])
    assert len(servicer.attempts) == 3
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_READY")
    assert caught.value.retry_delay_s == pytest.approx(0.01)
    with TandemClient(address, retry=NO_RETRY) as client, pytest.raises(TandemError):
        client.embed(["x"])
    assert len(servicer.attempts) == 4


def test_a_retry_that_would_pass_the_deadline_fails_at_once(flaky: tuple[FlakyGateway, str]) -> None:
    servicer, address = flaky
    servicer.failures = [status(errors.unavailable("loading", retry_after_s=30))]
    started = time.monotonic()
    with TandemClient(address, timeout=2) as client, pytest.raises(TandemError) as caught:
        client.embed(["x"])
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and caught.value.retry_delay_s == 30
    assert len(servicer.attempts) == 1 and time.monotonic() - started < 2


def test_the_deadline_covers_the_call_and_is_not_retried(flaky: tuple[FlakyGateway, str]) -> None:
    servicer, address = flaky
    servicer.hang_s = 1.0
    with TandemClient(address) as client, pytest.raises(TandemError) as caught:
        client.embed(["x"], timeout=0.2)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and caught.value.reason is None
    assert len(servicer.attempts) == 1


async def test_async_client_retries_too(flaky: tuple[FlakyGateway, str]) -> None:
    servicer, address = flaky
    servicer.failures = [status(errors.resource_exhausted("queue full", retry_after_s=0.05))] * 2
    async with AsyncTandemClient(address) as client:
        assert (await client.embed(["x"])).shape == (1, 2)
    assert len(servicer.attempts) == 3 and min(servicer.gaps()) >= 0.05
