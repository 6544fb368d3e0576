"""Random input to every service: texts of any code point and length, random and mutated bytes to every RPC,
random tensors and token batches. Every answer is a documented status code, never UNKNOWN or INTERNAL, and every
server answers normal requests as before (tests/fuzz/support.py)."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.inference.v1 import inference_pb2, inference_pb2_grpc
from tandem.postprocess.v1 import postprocess_pb2, postprocess_pb2_grpc
from tandem.tensor.v1 import tensor_pb2
from tests.fuzz.support import (
    CLIENT_FAULTS,
    FUZZ,
    GATEWAY_METHODS,
    STAGE_METHODS,
    STREAM_METHODS,
    TIMEOUT_S,
    Tally,
    Targets,
    calls,
    fuzzing,
    in_thread,
    send_bytes,
)

weird = st.text(st.characters(exclude_categories=["Cs"]), max_size=200)  # any code point but lone surrogates


texts = st.one_of(
    weird,
    st.just(""),
    st.just("\x00"),
    st.text(st.sampled_from(["\x00", "\u200b", "\ufeff", "\U0010ffff", "\u0301", "ﷺ", "\n", " ", "a"]), max_size=50),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "🙂", "\x00", " "]), st.integers(1_000, 6_000)),
)


async def test_random_texts_are_answered_or_refused_never_internal(targets: Targets, tally: Tally) -> None:
    def body(channels: dict[str, grpc.Channel]) -> None:
        stub = gateway_pb2_grpc.GatewayServiceStub(channels["gateway"])

        @FUZZ
        @given(inputs=st.lists(texts, max_size=4), truncate=st.booleans(), rpc=st.integers(0, 3))
        def check(inputs: list[str], truncate: bool, rpc: int) -> None:
            calls = [
                lambda: stub.Embed(
                    gateway_pb2.EmbedRequest(model="tiny-embed", inputs=inputs, truncate=truncate), timeout=TIMEOUT_S
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
                        model="tiny-rerank", query=inputs[0] if inputs else "", documents=inputs[1:], truncate=truncate
                    ),
                    timeout=TIMEOUT_S,
                ),
            ]
            code, details = tally.send(calls[rpc])
            assert code in CLIENT_FAULTS, (code, details, [t[:40] for t in inputs])

        check()
        assert tally.sent >= FUZZ.max_examples  # the examples really ran (and reached the server)

    await in_thread(fuzzing(tally, targets, body))


async def test_random_bytes_to_every_gateway_rpc(targets: Targets, tally: Tally) -> None:
    def body(channels: dict[str, grpc.Channel]) -> None:
        @FUZZ
        @given(call=calls(GATEWAY_METHODS, STREAM_METHODS))
        def check(call: tuple[str, bytes]) -> None:
            method, payload = call
            send_bytes(tally, channels["gateway"], method, payload, method in STREAM_METHODS)

        check()
        assert tally.sent >= FUZZ.max_examples

    await in_thread(fuzzing(tally, targets, body))


@pytest.mark.parametrize("stage", sorted(STAGE_METHODS))
async def test_random_bytes_to_every_stage_rpc(targets: Targets, tally: Tally, stage: str) -> None:
    """The stages face only the gateway, but a broken or hostile peer on their network must not bring them down."""

    def body(channels: dict[str, grpc.Channel]) -> None:
        @FUZZ
        @given(call=calls(STAGE_METHODS[stage]))
        def check(call: tuple[str, bytes]) -> None:
            send_bytes(tally, channels[stage], *call, streaming=False)

        check()
        assert tally.sent >= FUZZ.max_examples

    await in_thread(fuzzing(tally, targets, body))


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
            info = np.iinfo(kind.name)
            small = st.integers(max(-3, int(info.min)), 40)
            values = draw(
                st.lists(st.one_of(small, st.integers(int(info.min), int(info.max))), min_size=count, max_size=count)
            )
        data = np.array(values, dtype=kind).tobytes()
    else:
        data = draw(st.binary(max_size=64))
    return tensor_pb2.Tensor(dtype=tensor_pb2.DataType.ValueType(dtype), shape=shape, data=data)


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
            input_ids=tensor_pb2.Tensor(
                dtype=tensor_pb2.DATA_TYPE_INT64, shape=[total], data=np.array(ids, dtype=np.int64).tobytes()
            ),
            cu_seqlens=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_INT32, shape=[len(cu)], data=cu.tobytes()),
        )
        if draw(st.booleans()):
            types = draw(st.lists(st.integers(-1, 3), min_size=total, max_size=total))
            batch.token_type_ids.CopyFrom(
                tensor_pb2.Tensor(
                    dtype=tensor_pb2.DATA_TYPE_INT64, shape=[total], data=np.array(types, dtype=np.int64).tobytes()
                )
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


async def test_random_token_batches_to_the_inference_stage(targets: Targets, tally: Tally) -> None:
    def body(channels: dict[str, grpc.Channel]) -> None:
        stub = inference_pb2_grpc.InferenceServiceStub(channels["inference"])

        @FUZZ
        @given(model=st.sampled_from(["tiny-embed", "tiny-rerank", "tiny-ner"]), batch=token_batches())
        def check(model: str, batch: tensor_pb2.TokenBatch) -> None:
            request = inference_pb2.InferRequest(model=model, batch=batch)
            code, details = tally.send(lambda: stub.Infer(request, timeout=TIMEOUT_S))
            assert code in CLIENT_FAULTS, (code, details, request)

        check()
        assert tally.sent >= FUZZ.max_examples

    await in_thread(fuzzing(tally, targets, body))


async def test_random_tensors_to_the_postprocess_stage(targets: Targets, tally: Tally) -> None:
    def body(channels: dict[str, grpc.Channel]) -> None:
        stub = postprocess_pb2_grpc.PostprocessServiceStub(channels["postprocess"])

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
                    P.ClassifyTokensRequest(model="tiny-ner", logits=values, batch=batch, texts=text), timeout=TIMEOUT_S
                ),
            ]
            code, details = tally.send(calls[rpc])
            assert code in CLIENT_FAULTS, (code, details, rpc, values, batch, number)

        check()
        assert tally.sent >= FUZZ.max_examples

    await in_thread(fuzzing(tally, targets, body))
