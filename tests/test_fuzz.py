"""Hostile input: random texts, random bytes and random tensors never make a service fail with INTERNAL.

Hypothesis drives blocking gRPC channels from a worker thread while the in-process servers run on the test's event
loop. The examples are few and bounded so that the file stays well under a minute once the stack is up.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference import grpc_service_pb2 as oip
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.inference.v1 import inference_pb2, inference_pb2_grpc
from tandem.management.v1 import management_pb2
from tandem.postprocess.v1 import postprocess_pb2, postprocess_pb2_grpc
from tandem.tensor.v1 import tensor_pb2
from tests.conftest import Stack
from tests.gateways import Gateway, gateway_over

FUZZ = settings(
    max_examples=50,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples on every run: a failure here is reproducible, not a flake
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TIMEOUT_S = 20.0
# What a hostile request may get: an answer, or a refusal that names the request as the problem.
CLIENT_FAULTS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


@pytest.fixture(scope="module")
async def gateway(stack: Stack) -> AsyncIterator[Gateway]:
    async with gateway_over(stack, max_inputs=16, max_input_chars=5_000) as gateway:
        yield gateway


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


async def in_thread(run: Callable[[], None]) -> None:
    """Blocking Hypothesis loop off the event loop, which keeps serving meanwhile."""
    await asyncio.to_thread(run)


# ---------------------------------------------------------------------------------------------------------- texts

weird = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)  # any code point but lone surrogates
texts = st.one_of(
    weird,
    st.just(""),
    st.just("\x00"),
    st.text(st.sampled_from(["\x00", "\u200b", "\ufeff", "\U0010ffff", "\u0301", "ﷺ", "\n", " ", "a"]), max_size=50),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "🙂", "\x00", " "]), st.integers(1_000, 6_000)),
)


async def test_random_texts_are_answered_or_refused_never_internal(gateway: Gateway) -> None:
    def run() -> None:
        with grpc.insecure_channel(gateway.server.address) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)

            ran: list[None] = []

            @FUZZ
            @given(inputs=st.lists(texts, max_size=4), truncate=st.booleans(), rpc=st.integers(0, 3))
            def check(inputs: list[str], truncate: bool, rpc: int) -> None:
                ran.append(None)
                calls = [
                    lambda: stub.Embed(
                        gateway_pb2.EmbedRequest(model="tiny-embed", inputs=inputs, truncate=truncate),
                        timeout=TIMEOUT_S,
                    ),
                    lambda: stub.ClassifyTokens(
                        gateway_pb2.ClassifyTokensRequest(model="tiny-ner", inputs=inputs, truncate=truncate),
                        timeout=TIMEOUT_S,
                    ),
                    lambda: stub.Tokenize(
                        gateway_pb2.TokenizeRequest(model="tiny-embed", inputs=inputs), timeout=TIMEOUT_S
                    ),
                    lambda: stub.Rerank(
                        gateway_pb2.RerankRequest(
                            model="tiny-rerank",
                            query=inputs[0] if inputs else "",
                            documents=inputs[1:],
                            truncate=truncate,
                        ),
                        timeout=TIMEOUT_S,
                    ),
                ]
                code, details = code_of(calls[rpc])
                assert code in CLIENT_FAULTS, (code, details, [t[:40] for t in inputs])

            check()
            assert len(ran) >= FUZZ.max_examples  # the examples really ran (and reached the server)

    await in_thread(run)


# ------------------------------------------------------------------------------------------------------ raw bytes

GATEWAY_METHODS = [
    f"/{service.full_name}/{method.name}"
    for descriptor, name in (
        (gateway_pb2.DESCRIPTOR, "GatewayService"),
        (oip.DESCRIPTOR, "GRPCInferenceService"),
        (management_pb2.DESCRIPTOR, "ManagementService"),
    )
    for service in [descriptor.services_by_name[name]]
    for method in service.methods
    if not method.client_streaming
]
STREAM_METHODS = ["/tandem.gateway.v1.GatewayService/EmbedStream", "/inference.GRPCInferenceService/ModelStreamInfer"]


async def test_random_bytes_to_every_gateway_rpc(gateway: Gateway) -> None:
    def run() -> None:
        with grpc.insecure_channel(gateway.server.address) as channel:
            ran: list[None] = []

            @FUZZ
            @given(method=st.sampled_from(GATEWAY_METHODS + STREAM_METHODS), payload=st.binary(max_size=300))
            def check(method: str, payload: bytes) -> None:
                ran.append(None)
                if method in STREAM_METHODS:
                    stream = channel.stream_stream(method)

                    def call() -> None:
                        list(stream(iter([payload, payload]), timeout=TIMEOUT_S))

                else:
                    unary = channel.unary_unary(method)

                    def call() -> None:
                        unary(payload, timeout=TIMEOUT_S)

                code, details = code_of(call)
                # A request that does not parse is INVALID_ARGUMENT; one that does gets whatever its content deserves
                # (NOT_FOUND, UNIMPLEMENTED...), but never a failure of ours.
                assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (method, payload, details)

            check()
            assert len(ran) >= FUZZ.max_examples  # the examples really ran (and reached the server)
            # Still up, and still right.
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            reply = stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["still here"]), timeout=TIMEOUT_S)
            assert len(reply.embeddings) == 1

    await in_thread(run)


# -------------------------------------------------------------------------------------------------------- tensors

_NUMPY = {1: np.float32, 2: np.float16, 3: np.int64, 4: np.int32, 5: np.uint8}


@st.composite
def tensors(draw: st.DrawFn, dtype: int | None = None) -> tensor_pb2.Tensor:
    """A tensor whose dtype, shape and data agree or not; values from sensible to extreme (NaN, huge, negative)."""
    dtype = dtype if dtype is not None and draw(st.integers(0, 4)) else draw(st.sampled_from([0, 1, 2, 3, 4, 5, 17]))
    shape = draw(st.lists(st.one_of(st.integers(0, 6), st.sampled_from([-1, 2**40, 2**62])), max_size=4))
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    if dtype in _NUMPY and 0 <= count <= 512 and draw(st.integers(0, 3)):
        kind = np.dtype(_NUMPY[dtype])
        if kind.kind == "f":
            values = draw(st.lists(st.floats(width=16 if kind.itemsize == 2 else 32), min_size=count, max_size=count))
        else:
            info = np.iinfo(kind)
            small = st.integers(max(-3, int(info.min)), 40)
            values = draw(
                st.lists(st.one_of(small, st.integers(int(info.min), int(info.max))), min_size=count, max_size=count)
            )
        data = np.array(values, dtype=kind).tobytes()
    else:
        data = draw(st.binary(max_size=64))
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)  # type: ignore[arg-type]


@st.composite
def token_batches(draw: st.DrawFn) -> tensor_pb2.TokenBatch:
    """Either a well-formed ragged batch with arbitrary ids and lengths (empty sequences too), or random tensors."""
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, 12), min_size=0, max_size=4))
        total = sum(lengths)
        ids = draw(
            st.lists(
                st.one_of(st.integers(-3, 1_200), st.integers(-(2**63), 2**63 - 1)), min_size=total, max_size=total
            )
        )
        cu = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        batch = tensor_pb2.TokenBatch(
            input_ids=tensor_pb2.Tensor(dtype=3, shape=[total], data=np.array(ids, dtype=np.int64).tobytes()),
            cu_seqlens=tensor_pb2.Tensor(dtype=4, shape=[len(cu)], data=cu.tobytes()),
        )
        if draw(st.booleans()):
            types = draw(st.lists(st.integers(-1, 3), min_size=total, max_size=total))
            batch.token_type_ids.CopyFrom(
                tensor_pb2.Tensor(dtype=3, shape=[total], data=np.array(types, dtype=np.int64).tobytes())
            )
        return batch
    batch = tensor_pb2.TokenBatch()
    for name, dtype in (
        ("input_ids", 3),
        ("cu_seqlens", 4),
        ("token_type_ids", 3),
        ("offsets", 4),
        ("special_tokens_mask", 5),
    ):
        if draw(st.booleans()):
            getattr(batch, name).CopyFrom(draw(tensors(dtype)))
    return batch


async def test_random_token_batches_to_the_inference_stage(stack: Stack) -> None:
    address = stack.stages["inference"].address

    def run() -> None:
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            ran: list[None] = []

            @FUZZ
            @given(model=st.sampled_from(["tiny-embed", "tiny-rerank", "tiny-ner"]), batch=token_batches())
            def check(model: str, batch: tensor_pb2.TokenBatch) -> None:
                ran.append(None)
                request = inference_pb2.InferRequest(model=model, batch=batch)
                code, details = code_of(lambda: stub.Infer(request, timeout=TIMEOUT_S))
                assert code in CLIENT_FAULTS, (code, details, request)

            check()
            assert len(ran) >= FUZZ.max_examples  # the examples really ran (and reached the server)

    await in_thread(run)


async def test_random_tensors_to_the_postprocess_stage(stack: Stack) -> None:
    address = stack.stages["postprocess"].address

    def run() -> None:
        with grpc.insecure_channel(address) as channel:
            stub = postprocess_pb2_grpc.PostprocessServiceStub(channel)

            ran: list[None] = []

            @FUZZ
            @given(
                rpc=st.integers(0, 3),
                values=tensors(1),
                batch=token_batches(),
                number=st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 5),
                text=st.lists(weird, max_size=3),
            )
            def check(
                rpc: int, values: tensor_pb2.Tensor, batch: tensor_pb2.TokenBatch, number: int, text: list[str]
            ) -> None:
                ran.append(None)
                P = postprocess_pb2  # noqa: N806
                calls = [
                    lambda: stub.Pool(
                        P.PoolRequest(
                            model="tiny-embed",
                            token_embeddings=values,
                            cu_seqlens=batch.cu_seqlens,
                            normalize=number % 2 == 0,
                        ),
                        timeout=TIMEOUT_S,
                    ),
                    lambda: stub.Classify(
                        P.ClassifyRequest(model="tiny-sentiment", logits=values, top_k=number), timeout=TIMEOUT_S
                    ),
                    lambda: stub.Rerank(
                        P.RerankRequest(model="tiny-rerank", logits=values, top_n=number), timeout=TIMEOUT_S
                    ),
                    lambda: stub.ClassifyTokens(
                        P.ClassifyTokensRequest(model="tiny-ner", logits=values, batch=batch, texts=text),
                        timeout=TIMEOUT_S,
                    ),
                ]
                code, details = code_of(calls[rpc])
                assert code in CLIENT_FAULTS, (code, details, rpc, values, batch, number)

            check()
            assert len(ran) >= FUZZ.max_examples  # the examples really ran (and reached the server)

    await in_thread(run)


async def test_a_request_that_does_not_parse_is_invalid_argument(gateway: Gateway) -> None:
    """Found by the fuzzing above: grpc answered UNKNOWN (unary) and the error table INTERNAL (streams)."""
    from tests.status import details_of

    unary = gateway.channel.unary_unary("/tandem.gateway.v1.GatewayService/Embed")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(b"\x00")
    d = details_of(caught.value)
    assert (d.code, d.reason, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", ["request"])
    assert "tandem.gateway.v1.EmbedRequest" in d.message
    for method in STREAM_METHODS:
        stream = gateway.channel.stream_stream(method)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream(iter([b"\x00"])):
                pass
        d = details_of(caught.value)
        assert (d.code, d.reason, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", ["request"])
