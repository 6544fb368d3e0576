"""Request limits at the gateway: characters per text, texts per request, streams per connection, texts per second."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.auth import AuthInterceptor, KeyRing, parse_keys
from gateway.limits import RateLimiter, RateLimitInterceptor
from gateway.settings import GatewaySettings
from services.common.settings import ServiceSettings
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.oip.v2 import grpc_service_pb2 as oip
from tandem.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from tandem.sdk import NO_RETRY, AsyncTandemClient, RetryPolicy, TandemError
from tests.harness import Gateway, Stack, gateway_over
from tests.status import details_of

LONG = "x" * 21  # over the limit of 20 used below


@pytest.fixture(scope="module")
async def limited(stack: Stack) -> AsyncIterator[Gateway]:
    async with gateway_over(stack, max_inputs=3, max_input_chars=20) as gateway:
        yield gateway


async def invalid(call: Awaitable[object]) -> tuple[grpc.StatusCode, str | None, list[str], str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    d = details_of(caught.value)
    return d.code, d.reason, d.fields, d.message


def oip_embed(texts: list[str], shape: list[int] | None = None) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="tiny-embed")
    request.inputs.append(
        oip.ModelInferRequest.InferInputTensor(
            name="text",
            datatype="BYTES",
            shape=shape or [len(texts)],
            contents=oip.InferTensorContents(bytes_contents=[t.encode() for t in texts]),
        )
    )
    return request


async def test_too_many_characters_names_the_input(limited: Gateway) -> None:
    stub = gateway_pb2_grpc.GatewayServiceStub(limited.channel)
    cases: list[tuple[Awaitable[object], str]] = [
        (stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["ok", LONG])), "inputs[1]"),
        (stub.Classify(gateway_pb2.ClassifyRequest(model="tiny-sentiment", inputs=[LONG])), "inputs[0]"),
        (
            stub.ClassifyTokens(gateway_pb2.ClassifyTokensRequest(model="tiny-ner", inputs=["a", "b", LONG])),
            "inputs[2]",
        ),
        (stub.Tokenize(gateway_pb2.TokenizeRequest(model="tiny-embed", inputs=[LONG])), "inputs[0]"),
        (stub.Rerank(gateway_pb2.RerankRequest(model="tiny-rerank", query=LONG, documents=["d"])), "query"),
        (stub.Rerank(gateway_pb2.RerankRequest(model="tiny-rerank", query="q", documents=["d", LONG])), "documents[1]"),
    ]
    for call, field in cases:
        code, reason, fields, message = await invalid(call)
        assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LONG", [field])
        assert "21 characters" in message and "limit of 20" in message
    # Characters, not bytes: 20 four-byte code points are within the limit.
    reply = await stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["🙂" * 20]))
    assert len(reply.embeddings) == 1
    infer = oip_grpc.GRPCInferenceServiceStub(limited.channel)
    code, reason, fields, _ = await invalid(infer.ModelInfer(oip_embed(["fine", LONG])))
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LONG", ["inputs[text][1]"])


async def test_too_many_inputs_on_every_entry_point(limited: Gateway) -> None:
    stub = gateway_pb2_grpc.GatewayServiceStub(limited.channel)
    four = ["a", "b", "c", "d"]
    cases: list[tuple[Awaitable[object], str]] = [
        (stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=four)), "inputs"),
        (stub.Classify(gateway_pb2.ClassifyRequest(model="tiny-sentiment", inputs=four)), "inputs"),
        (stub.ClassifyTokens(gateway_pb2.ClassifyTokensRequest(model="tiny-ner", inputs=four)), "inputs"),
        (stub.Tokenize(gateway_pb2.TokenizeRequest(model="tiny-embed", inputs=four)), "inputs"),
        (stub.Rerank(gateway_pb2.RerankRequest(model="tiny-rerank", query="q", documents=four)), "documents"),
        (oip_grpc.GRPCInferenceServiceStub(limited.channel).ModelInfer(oip_embed(four)), "inputs[text]"),
    ]
    for call, field in cases:
        code, reason, fields, message = await invalid(call)
        assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_INPUTS", [field])
        assert "limit of 3" in message
    # A stream answers the one oversized request with its error and goes on.
    requests = [
        gateway_pb2.EmbedStreamRequest(id="big", request=gateway_pb2.EmbedRequest(model="tiny-embed", inputs=four)),
        gateway_pb2.EmbedStreamRequest(id="ok", request=gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["a"])),
    ]
    answers = [a async for a in stub.EmbedStream(iter(requests))]
    assert [a.id for a in answers] == ["big", "ok"]
    assert answers[0].error.reason == "TOO_MANY_INPUTS" and list(answers[0].error.fields) == ["inputs"]
    assert len(answers[1].response.embeddings) == 1


async def test_over_the_rate_is_resource_exhausted_with_retry_info(stack: Stack) -> None:
    # Slow enough that the model's own time cannot refill the bucket between two calls on a busy machine.
    limiter = RateLimitInterceptor(RateLimiter(rate=4, burst=4), max_cost=100)
    async with gateway_over(stack, interceptors=[limiter]) as gateway:
        stub = gateway_pb2_grpc.GatewayServiceStub(gateway.channel)
        await stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["a"] * 4))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["a", "b"]))
        d = details_of(caught.value)
        assert (d.code, d.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert d.retry_delay_s is not None and 0 < d.retry_delay_s <= 0.5 + 1e-6
        assert "4 texts/s" in d.message
        # After the wait it asks for, the same request goes through.
        await asyncio.sleep(d.retry_delay_s)
        await stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["a", "b"]))
        # The Python client honours RetryInfo on its own: a burst of calls all succeed, some after waiting.
        async with AsyncTandemClient(gateway.server.address, retry=RetryPolicy(max_attempts=20)) as client:
            for _ in range(3):
                await client.embed(["a", "b", "c"], model="tiny-embed")
        async with AsyncTandemClient(gateway.server.address, retry=NO_RETRY) as impatient:
            with pytest.raises(TandemError) as refused:
                for _ in range(3):
                    await impatient.embed(["a", "b", "c", "d"], model="tiny-embed")
            assert refused.value.reason == "RATE_LIMITED" and refused.value.retry_delay_s


async def test_each_key_has_its_own_bucket_and_streams_slow_down(stack: Stack) -> None:
    keys = KeyRing(parse_keys("key-a;key-b", "test"))
    interceptors = [AuthInterceptor(keys), RateLimitInterceptor(RateLimiter(rate=5, burst=2), max_cost=100)]
    async with gateway_over(stack, interceptors=interceptors) as gateway:
        stub = gateway_pb2_grpc.GatewayServiceStub(gateway.channel)
        request = gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["a", "b"])
        await stub.Embed(request, metadata=(("x-api-key", "key-a"),))
        code, reason, _, _ = await invalid(stub.Embed(request, metadata=(("x-api-key", "key-a"),)))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        await stub.Embed(request, metadata=(("authorization", "Bearer key-b"),))
        # A stream over the rate is slowed down, not cut: every request is answered.
        items = [gateway_pb2.EmbedStreamRequest(id=str(i), request=request) for i in range(3)]
        answers = [a async for a in stub.EmbedStream(iter(items), metadata=(("x-api-key", "key-b"),))]
        assert [a.id for a in answers] == [str(i) for i in range(3)]
        assert all(not a.HasField("error") for a in answers)


async def test_concurrent_streams_per_connection_are_capped(stack: Stack) -> None:
    async with gateway_over(stack, options=[("grpc.max_concurrent_streams", 1)]) as gateway:
        stub = gateway_pb2_grpc.GatewayServiceStub(gateway.channel)
        release = asyncio.Event()

        async def held() -> AsyncIterator[gateway_pb2.EmbedStreamRequest]:
            await release.wait()
            yield gateway_pb2.EmbedStreamRequest(
                id="1", request=gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["a"])
            )

        first = stub.EmbedStream(held())
        await first.wait_for_connection()
        second = asyncio.ensure_future(stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["b"])))
        done, _ = await asyncio.wait({second}, timeout=0.5)
        assert not done  # queued on the client until the open stream ends
        release.set()
        assert [a.id async for a in first] == ["1"]
        assert len((await second).embeddings) == 1


def _big_request(service: str) -> tuple[str, bytes]:
    """A request of about 100 KiB to one RPC of `service`, serialized."""
    from tandem.inference.v1 import inference_pb2
    from tandem.postprocess.v1 import postprocess_pb2
    from tandem.tensor.v1 import tensor_pb2
    from tandem.tokenizer.v1 import tokenizer_pb2

    text = "x" * 100_000
    if service == "gateway":
        return "/tandem.gateway.v1.GatewayService/Embed", gateway_pb2.EmbedRequest(inputs=[text]).SerializeToString()
    if service == "tokenizer":
        return "/tandem.tokenizer.v1.TokenizerService/Tokenize", tokenizer_pb2.TokenizeRequest(
            texts=[text]
        ).SerializeToString()
    ids = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_INT64, shape=[12_800], data=bytes(102_400))
    if service == "inference":
        batch = tensor_pb2.TokenBatch(input_ids=ids)
        return "/tandem.inference.v1.InferenceService/Infer", inference_pb2.InferRequest(
            batch=batch
        ).SerializeToString()
    floats = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[800, 32], data=bytes(102_400))
    return "/tandem.postprocess.v1.PostprocessService/Pool", postprocess_pb2.PoolRequest(
        token_embeddings=floats
    ).SerializeToString()


@pytest.mark.parametrize("service", ["gateway", "tokenizer", "inference", "postprocess"])
async def test_a_message_over_max_message_bytes_is_resource_exhausted(
    stack: Stack, tmp_path: Path, service: str
) -> None:
    """Each service's --max-message-bytes, wired as its __main__ does, refuses a bigger request before parsing it."""
    from gateway.servicer import registrar as gateway_registrar
    from services.common.repository import ModelRepository
    from services.common.server import start_server
    from services.inference.core import Inference
    from services.inference.servicer import registrar as inference_registrar
    from services.inference.settings import InferenceSettings
    from services.postprocess.core import Postprocessor
    from services.postprocess.servicer import registrar as postprocess_registrar
    from services.postprocess.settings import PostprocessSettings
    from services.tokenizer.core import Tokenizer
    from services.tokenizer.servicer import registrar as tokenizer_registrar
    from services.tokenizer.settings import TokenizerSettings

    settings_of: dict[str, type[ServiceSettings]] = {
        "gateway": GatewaySettings,
        "tokenizer": TokenizerSettings,
        "inference": InferenceSettings,
        "postprocess": PostprocessSettings,
    }
    settings = settings_of[service].from_args(["--max-message-bytes=65536"], f"tandem {service}")
    assert settings.max_message_bytes == 65_536
    repository = ModelRepository(stack.repository)
    registrar = {
        "gateway": lambda: gateway_registrar(stack.pipeline),
        "tokenizer": lambda: tokenizer_registrar(Tokenizer(repository)),
        # Never started: a refused message must not reach the core.
        "inference": lambda: inference_registrar(Inference(repository, home=tmp_path, watch_s=None)),
        "postprocess": lambda: postprocess_registrar(Postprocessor(repository)),
    }[service]()
    running = await start_server("127.0.0.1:0", [registrar], max_message_bytes=settings.max_message_bytes)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            method, payload = _big_request(service)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
                await raw(payload, timeout=10)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in (caught.value.details() or "")
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # small messages still pass
    finally:
        await running.stop(0)


async def test_an_answer_over_max_message_bytes_is_resource_exhausted(stack: Stack) -> None:
    """The limit holds for what a service sends too: a small request whose answer would not fit is refused."""
    from services.common.repository import ModelRepository
    from services.common.server import start_server
    from services.tokenizer.core import Tokenizer
    from services.tokenizer.servicer import registrar as tokenizer_registrar
    from tandem.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

    tokenizer = Tokenizer(ModelRepository(stack.repository))
    running = await start_server("127.0.0.1:0", [tokenizer_registrar(tokenizer)], max_message_bytes=65_536)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            texts = ["hello world"] * 1_500  # about 20 KB in, over 64 KiB of ids and type ids out
            assert len(tokenizer_pb2.TokenizeRequest(model="tiny-embed", texts=texts).SerializeToString()) < 65_536
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Tokenize(tokenizer_pb2.TokenizeRequest(model="tiny-embed", texts=texts), timeout=10)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            small = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(model="tiny-embed", texts=texts[:10]), timeout=10)
            assert small.model == "tiny-embed"
    finally:
        await running.stop(0)
