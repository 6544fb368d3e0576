"""The shared server bootstrap: unexpected errors become a bare INTERNAL, request ids travel, health and drain."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.core import CATALOG_REQUEST_ID
from services.common.server import start_server
from services.tokenizer.core import Encoded, TokenizeOptions
from services.tokenizer.servicer import registrar
from tandem.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tests.harness import Stack
from tests.status import details_of


class BrokenTokenizer:
    """A core that fails the way a bug would: with an exception the error table does not know."""

    async def tokenize(
        self, model: str, texts: Sequence[str], pairs: Sequence[str], options: TokenizeOptions
    ) -> Encoded:
        raise RuntimeError("secret internal detail /etc/passwd")

    async def detokenize(self, model: str, ids: Sequence[int], skip: bool) -> tuple[str, str]:
        raise KeyError("another secret")


async def test_unexpected_errors_are_internal_with_a_generic_message(caplog: pytest.LogCaptureFixture) -> None:
    running = await start_server("127.0.0.1:0", [registrar(BrokenTokenizer())])  # type: ignore[arg-type]
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=["x"]), metadata=(("x-request-id", "req-42"),))
            d = details_of(caught.value)
            assert (d.code, d.message, d.reason) == (grpc.StatusCode.INTERNAL, "internal error", "INTERNAL")
            trailers = str(caught.value.trailing_metadata())
            assert "secret" not in trailers and "Traceback" not in trailers
            # The cause is in the log, with the call's request id, not in the answer.
            assert any("secret internal detail" in (r.exc_text or "") for r in caplog.records)
            assert any(getattr(r, "request_id", None) == "req-42" for r in caplog.records)
            # The same for another RPC of the service: no method can forget the error table.
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await stub.Detokenize(tokenizer_pb2.DetokenizeRequest(ids=[1]))
            assert (again.value.code(), again.value.details()) == (grpc.StatusCode.INTERNAL, "internal error")
    finally:
        await running.stop(0)


async def test_the_request_id_is_echoed_or_made_up(stack: Stack) -> None:
    """Unary calls carry it in their trailers only (no headers ahead of the answer); streams in both."""
    from tandem.gateway.v1 import gateway_pb2

    call = stack.stub.Embed(
        gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["good"]), metadata=(("x-request-id", "abc-123"),)
    )
    await call
    assert dict(await call.trailing_metadata())["x-request-id"] == "abc-123"
    assert "x-request-id" not in dict(await call.initial_metadata())
    fresh = stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["good"]))
    await fresh
    assert len(dict(await fresh.trailing_metadata())["x-request-id"]) == 32

    failed = stack.stub.Embed(
        gateway_pb2.EmbedRequest(model="no-such-model", inputs=["x"]), metadata=(("x-request-id", "err-1"),)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await failed
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    trailers = dict(caught.value.trailing_metadata() or ())
    assert trailers["x-request-id"] == "err-1"
    assert "grpc-status-details-bin" in trailers  # the rich status is still there beside it

    async def requests() -> Any:
        yield gateway_pb2.EmbedStreamRequest(
            id="a", request=gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["one"])
        )

    stream = stack.stub.EmbedStream(requests(), metadata=(("x-request-id", "stream-1"),))
    assert dict(await stream.initial_metadata())["x-request-id"] == "stream-1"
    assert len([answer async for answer in stream]) == 1
    assert dict(await stream.trailing_metadata())["x-request-id"] == "stream-1"


async def test_a_stage_server_does_not_echo_the_request_id_but_still_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    """Stages answer only the gateway, which sent the id: no headers ahead of the answer (one write less a call)."""
    running = await start_server(
        "127.0.0.1:0",
        [registrar(BrokenTokenizer())],  # type: ignore[arg-type]
        echo_request_id=False,
    )
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            call = stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=["x"]), metadata=(("x-request-id", "quiet-1"),))
            with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.INTERNAL
            assert "x-request-id" not in dict(await call.initial_metadata())
            assert any(getattr(r, "request_id", None) == "quiet-1" for r in caplog.records)
    finally:
        await running.stop(0)


async def test_every_line_each_service_logs_for_a_call_carries_its_request_id(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """One id from the caller through gateway, tokenizer, inference and postprocess, in text and JSON lines alike."""
    import json

    from services.common.logging import _JsonFormatter
    from tandem.gateway.v1 import gateway_pb2

    stub = stack.stub
    with caplog.at_level(logging.DEBUG):
        # Texts no other test sends, so no cache or merged run answers for another call.
        await stub.Embed(
            gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["trail one text"]),
            metadata=(("x-request-id", "trail-1"),),
        )
        await stub.Rerank(
            gateway_pb2.RerankRequest(model="tiny-rerank", query="trail two", documents=["a trail", "two"]),
            metadata=(("x-request-id", "trail-2"),),
        )
        with pytest.raises(grpc.aio.AioRpcError):  # refused by the stage that looks the model up
            await stub.Embed(
                gateway_pb2.EmbedRequest(model="no-such-model", inputs=["x"]), metadata=(("x-request-id", "trail-3"),)
            )
    # Lines of Tandem's own code; health probes and the model catalog's background refreshes the gateway may send
    # meanwhile are other calls with their own ids.
    ours = [
        r
        for r in caplog.records
        if r.name.split(".")[0] in ("services", "gateway", "tandem")
        and "grpc.health" not in r.getMessage()
        and getattr(r, "request_id") != CATALOG_REQUEST_ID  # noqa: B009
    ]
    rids = {getattr(r, "request_id") for r in ours}  # noqa: B009
    assert rids == {"trail-1", "trail-2", "trail-3"}

    def stages(rid: str) -> set[str]:
        called = [r.getMessage().split()[0] for r in ours if getattr(r, "request_id") == rid]  # noqa: B009
        return {m.split("/")[1].split(".")[1] for m in called if m.startswith("/tandem.")}

    assert stages("trail-1") == stages("trail-2") == {"gateway", "tokenizer", "inference", "postprocess"}
    assert "gateway" in stages("trail-3") and len(stages("trail-3")) > 1  # the stage that refused logged it too
    refusals = [r for r in ours if "answered NOT_FOUND" in r.getMessage()]
    assert refusals and all(getattr(r, "request_id") == "trail-3" for r in refusals)  # noqa: B009
    formatter = _JsonFormatter()
    assert {json.loads(formatter.format(r))["request_id"] for r in ours} == rids


async def test_stop_turns_health_not_serving_first() -> None:
    running = await start_server("127.0.0.1:0", [registrar(BrokenTokenizer())])  # type: ignore[arg-type]
    async with grpc.aio.insecure_channel(running.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
        await running.set_serving(False)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="tandem.tokenizer.v1.TokenizerService"))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await running.stop(0)
