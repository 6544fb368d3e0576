"""Targeted hostile input to every service: huge repeated fields, invalid UTF-8 in any string, non-finite tensors,
bad token ids, dtypes and shapes, and requests that do not parse. Each must be refused with INVALID_ARGUMENT naming
the field (never UNKNOWN or INTERNAL), and every server must answer normal requests as before."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message

from services.common.server import ANSWERED_IN_STREAM
from tandem.gateway.v1 import gateway_pb2
from tandem.inference.v1 import inference_pb2
from tandem.management.v1 import management_pb2
from tandem.oip.v2 import grpc_service_pb2 as oip
from tandem.postprocess.v1 import postprocess_pb2
from tandem.tensor.v1 import tensor_pb2
from tandem.tokenizer.v1 import tokenizer_pb2
from tests.fuzz.support import (
    HUGE,
    INVALID,
    NER_BATCH,
    NER_TEXTS,
    REFERENCE_BATCH,
    REFERENCE_EMBEDDINGS,
    STREAM_METHODS,
    TIMEOUT_S,
    Case,
    Tally,
    Targets,
    check_cases,
    float_tensor,
    fuzzing,
    ids_tensor,
    in_thread,
    path,
    ragged,
)
from tests.harness import Gateway
from tests.status import details_of

NAN, INF = float("nan"), float("inf")


async def test_huge_repeated_fields_are_refused_not_internal(targets: Targets, tally: Tally) -> None:
    """100k texts, ids or sequences in one message: INVALID_ARGUMENT naming the field, at every service."""
    empty = [""] * HUGE
    oip_huge = oip.ModelInferRequest(
        model_name="tiny-embed",
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="text",
                datatype="BYTES",
                shape=[HUGE],
                contents=oip.InferTensorContents(bytes_contents=[b""] * HUGE),
            )
        ],
    )
    gateway = gateway_pb2
    cases: list[Case] = [
        (
            "gateway",
            path(gateway, "GatewayService", "Embed"),
            gateway.EmbedRequest(model="tiny-embed", inputs=empty),
            INVALID,
            "inputs",
        ),
        (
            "gateway",
            path(gateway, "GatewayService", "Tokenize"),
            gateway.TokenizeRequest(model="tiny-embed", inputs=empty),
            INVALID,
            "inputs",
        ),
        (
            "gateway",
            path(gateway, "GatewayService", "Rerank"),
            gateway.RerankRequest(model="tiny-rerank", query="q", documents=empty),
            INVALID,
            "documents",
        ),
        (
            "gateway",
            path(gateway, "GatewayService", "Detokenize"),
            gateway.DetokenizeRequest(model="tiny-embed", ids=[2**62] * HUGE),
            INVALID,
            "ids",
        ),
        ("gateway", path(oip, "GRPCInferenceService", "ModelInfer"), oip_huge, INVALID, "inputs[text]"),
        (
            "tokenizer",
            path(tokenizer_pb2, "TokenizerService", "Tokenize"),
            tokenizer_pb2.TokenizeRequest(model="tiny-embed", texts=empty),
            INVALID,
            "inputs",
        ),
        (
            "tokenizer",
            path(tokenizer_pb2, "TokenizerService", "Tokenize"),
            tokenizer_pb2.TokenizeRequest(model="tiny-rerank", texts=["q"], text_pairs=empty),
            INVALID,
            "text_pairs",
        ),
        (
            "tokenizer",
            path(tokenizer_pb2, "TokenizerService", "Detokenize"),
            tokenizer_pb2.DetokenizeRequest(model="tiny-embed", ids=[2**62] * HUGE),
            INVALID,
            "ids",
        ),
        (
            "tokenizer",
            path(tokenizer_pb2, "TokenizerService", "Detokenize"),
            tokenizer_pb2.DetokenizeRequest(model="tiny-embed", ids=[-1] * HUGE),
            INVALID,
            "ids",
        ),
        (
            "inference",
            path(inference_pb2, "InferenceService", "Infer"),
            inference_pb2.InferRequest(
                model="tiny-embed",
                batch=tensor_pb2.TokenBatch(
                    input_ids=ids_tensor([]), cu_seqlens=ids_tensor([0] * HUGE, tensor_pb2.DATA_TYPE_INT32)
                ),
            ),
            INVALID,
            "batch.cu_seqlens",
        ),
        (
            "inference",
            path(inference_pb2, "InferenceService", "Infer"),
            inference_pb2.InferRequest(
                model="tiny-embed",
                batch=tensor_pb2.TokenBatch(input_ids=ids_tensor([2] * HUGE), cu_seqlens=ragged([1] * HUGE)),
            ),
            INVALID,
            "batch.cu_seqlens",
        ),
        (
            "inference",
            path(inference_pb2, "InferenceService", "Infer"),
            inference_pb2.InferRequest(
                model="tiny-embed",
                batch=tensor_pb2.TokenBatch(input_ids=ids_tensor([2] * HUGE), cu_seqlens=ragged([HUGE])),
            ),
            INVALID,
            "batch.cu_seqlens",
        ),
        (
            "postprocess",
            path(postprocess_pb2, "PostprocessService", "Pool"),
            postprocess_pb2.PoolRequest(
                model="tiny-embed",
                token_embeddings=REFERENCE_EMBEDDINGS,
                cu_seqlens=ids_tensor([0] * HUGE, tensor_pb2.DATA_TYPE_INT32),
            ),
            INVALID,
            "cu_seqlens",
        ),
        (
            "postprocess",
            path(postprocess_pb2, "PostprocessService", "ClassifyTokens"),
            postprocess_pb2.ClassifyTokensRequest(
                model="tiny-ner", logits=float_tensor(np.zeros((7, 5))), batch=NER_BATCH, texts=empty
            ),
            INVALID,
            "texts",
        ),
    ]
    await in_thread(fuzzing(tally, targets, lambda channels: check_cases(tally, channels, cases)))


BAD_UTF8 = b"ok\xc3\x28\xff"  # a lead byte without its continuation, and a byte no UTF-8 text holds


def with_bad_utf8(message: Message, field_name: str) -> bytes:
    """`message` serialized with one more occurrence of the string field `field_name`, holding invalid UTF-8.

    Python's protobuf refuses to build such a message, so the field is written by hand: tag, length, bytes.
    """
    number = message.DESCRIPTOR.fields_by_name[field_name].number
    assert number < 16  # a one-byte tag
    return message.SerializeToString() + bytes([(number << 3) | 2, len(BAD_UTF8)]) + BAD_UTF8


async def test_invalid_utf8_in_any_string_is_invalid_argument(targets: Targets, tally: Tally) -> None:
    cases = [
        (
            "gateway",
            path(gateway_pb2, "GatewayService", "Embed"),
            gateway_pb2.EmbedRequest(model="tiny-embed"),
            "inputs",
        ),
        ("gateway", path(gateway_pb2, "GatewayService", "Embed"), gateway_pb2.EmbedRequest(inputs=["a"]), "model"),
        (
            "gateway",
            path(gateway_pb2, "GatewayService", "Rerank"),
            gateway_pb2.RerankRequest(model="tiny-rerank"),
            "query",
        ),
        (
            "gateway",
            path(gateway_pb2, "GatewayService", "EmbedStream"),
            gateway_pb2.EmbedStreamRequest(request=gateway_pb2.EmbedRequest(model="tiny-embed")),
            "id",
        ),
        ("gateway", path(oip, "GRPCInferenceService", "ModelInfer"), oip.ModelInferRequest(), "model_name"),
        (
            "gateway",
            path(management_pb2, "ManagementService", "SetAlias"),
            management_pb2.SetAliasRequest(name="x"),
            "alias",
        ),
        (
            "tokenizer",
            path(tokenizer_pb2, "TokenizerService", "Tokenize"),
            tokenizer_pb2.TokenizeRequest(model="tiny-embed"),
            "texts",
        ),
        (
            "tokenizer",
            path(tokenizer_pb2, "TokenizerService", "Tokenize"),
            tokenizer_pb2.TokenizeRequest(texts=["a"]),
            "text_pairs",
        ),
        (
            "tokenizer",
            path(tokenizer_pb2, "TokenizerService", "Detokenize"),
            tokenizer_pb2.DetokenizeRequest(ids=[2]),
            "model",
        ),
        (
            "inference",
            path(inference_pb2, "InferenceService", "Infer"),
            inference_pb2.InferRequest(batch=REFERENCE_BATCH),
            "model",
        ),
        (
            "inference",
            path(inference_pb2, "InferenceService", "Infer"),
            inference_pb2.InferRequest(model="tiny-embed"),
            "tokenizer_fingerprint",
        ),
        (
            "inference",
            path(management_pb2, "ManagementService", "LoadModel"),
            management_pb2.LoadModelRequest(),
            "name",
        ),
        (
            "postprocess",
            path(postprocess_pb2, "PostprocessService", "ClassifyTokens"),
            postprocess_pb2.ClassifyTokensRequest(model="tiny-ner"),
            "texts",
        ),
        ("postprocess", path(postprocess_pb2, "PostprocessService", "Pool"), postprocess_pb2.PoolRequest(), "model"),
    ]

    def body(channels: dict[str, grpc.Channel]) -> None:
        failures = []
        for service, method, message, field_name in cases:
            raw = with_bad_utf8(message, field_name)
            streaming = method in STREAM_METHODS
            error: list[grpc.RpcError] = []

            def call(
                channel: grpc.Channel = channels[service],
                method: str = method,
                raw: bytes = raw,
                streaming: bool = streaming,
                error: list[grpc.RpcError] = error,
            ) -> None:
                try:
                    if streaming:
                        stream: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(method)
                        list(stream(iter([raw]), timeout=TIMEOUT_S))
                    else:
                        unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
                        unary(raw, timeout=TIMEOUT_S)
                except grpc.RpcError as err:
                    error.append(err)
                    raise

            code, details = tally.send(call)
            fields = details_of(error[0]).fields if error else []
            if code != grpc.StatusCode.INVALID_ARGUMENT or fields != ["request"] or "UTF-8" not in details:
                failures.append((service, method, field_name, code, details, fields))
        assert not failures, failures

    await in_thread(fuzzing(tally, targets, body))


async def test_non_finite_tensors_to_postprocess_are_invalid_argument(targets: Targets, tally: Tally) -> None:
    P = postprocess_pb2  # noqa: N806
    Pool, Classify, Rerank, Tokens = (  # noqa: N806
        path(P, "PostprocessService", m) for m in ("Pool", "Classify", "Rerank", "ClassifyTokens")
    )
    cases: list[Case] = []
    for bad in (NAN, INF, -INF):
        embeddings = np.arange(192, dtype=np.float32).reshape(6, 32)
        embeddings[3, 1] = bad
        cases += [
            (
                "postprocess",
                Pool,
                P.PoolRequest(model="tiny-embed", token_embeddings=float_tensor(embeddings), cu_seqlens=ragged([2, 4])),
                INVALID,
                "token_embeddings",
            ),
            (
                "postprocess",
                Classify,
                P.ClassifyRequest(model="tiny-sentiment", logits=float_tensor([[0.0, bad, 1.0]])),
                INVALID,
                "logits",
            ),
            (
                "postprocess",
                Rerank,
                P.RerankRequest(model="tiny-rerank", logits=float_tensor([[1.0], [bad]])),
                INVALID,
                "logits",
            ),
            (
                "postprocess",
                Tokens,
                P.ClassifyTokensRequest(
                    model="tiny-ner", logits=float_tensor(np.full((7, 5), bad)), batch=NER_BATCH, texts=NER_TEXTS
                ),
                INVALID,
                "logits",
            ),
        ]
    half = np.array([[1.0, 65504.0, 0.0]], dtype=np.float16) * np.float16(2)  # overflows float16 to inf
    cases += [
        (
            "postprocess",
            Classify,
            P.ClassifyRequest(
                model="tiny-sentiment",
                logits=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT16, shape=[1, 3], data=half.tobytes()),
            ),
            INVALID,
            "logits",
        ),
        # Wrong dtypes and shapes.
        (
            "postprocess",
            Classify,
            P.ClassifyRequest(
                model="tiny-sentiment",
                logits=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_INT64, shape=[1, 3], data=bytes(24)),
            ),
            INVALID,
            "logits.dtype",
        ),
        (
            "postprocess",
            Classify,
            P.ClassifyRequest(model="tiny-sentiment", logits=float_tensor([0.5, 0.5, 0.5])),
            INVALID,
            "logits.shape",
        ),
        (
            "postprocess",
            Rerank,
            P.RerankRequest(model="tiny-rerank", logits=float_tensor(np.zeros((2, 2, 2)))),
            INVALID,
            "logits.shape",
        ),
        (
            "postprocess",
            Pool,
            P.PoolRequest(model="tiny-embed", token_embeddings=float_tensor(np.zeros(6)), cu_seqlens=ragged([6])),
            INVALID,
            "token_embeddings.shape",
        ),
        (
            "postprocess",
            Pool,
            P.PoolRequest(
                model="tiny-embed", token_embeddings=REFERENCE_EMBEDDINGS, cu_seqlens=float_tensor([0.0, 6.0])
            ),
            INVALID,
            "cu_seqlens.dtype",
        ),
    ]
    await in_thread(fuzzing(tally, targets, lambda channels: check_cases(tally, channels, cases)))


async def test_bad_token_ids_dtypes_and_shapes_to_inference_are_invalid_argument(
    targets: Targets, tally: Tally
) -> None:
    """Ids outside the vocabulary would index out of the embedding table: the stage refuses them before the model."""
    Infer = path(inference_pb2, "InferenceService", "Infer")  # noqa: N806

    def infer(model: str, **batch: tensor_pb2.Tensor) -> inference_pb2.InferRequest:
        return inference_pb2.InferRequest(model=model, batch=tensor_pb2.TokenBatch(**batch))

    cases: list[Case] = []
    for model in ("tiny-embed", "tiny-ner", "tiny-rerank"):
        for bad in (-1, -(2**63), 2**31, 2**62, 10**6):
            cases.append(
                (
                    "inference",
                    Infer,
                    infer(model, input_ids=ids_tensor([2, bad, 3]), cu_seqlens=ragged([3])),
                    INVALID,
                    "batch.input_ids",
                )
            )
        cases.append(
            (
                "inference",
                Infer,
                infer(model, input_ids=ids_tensor([2, -7], tensor_pb2.DATA_TYPE_INT32), cu_seqlens=ragged([2])),
                INVALID,
                "batch.input_ids",
            )
        )
        cases.append(
            (
                "inference",
                Infer,
                infer(
                    model, input_ids=ids_tensor([2, 3]), token_type_ids=ids_tensor([0, 2**40]), cu_seqlens=ragged([2])
                ),
                INVALID,
                "batch.token_type_ids",
            )
        )
    cases += [
        (
            "inference",
            Infer,
            infer("tiny-embed", input_ids=float_tensor([2.0, 3.0]), cu_seqlens=ragged([2])),
            INVALID,
            "batch.input_ids.dtype",
        ),
        (
            "inference",
            Infer,
            infer(
                "tiny-embed",
                input_ids=tensor_pb2.Tensor(
                    dtype=tensor_pb2.DATA_TYPE_INT64, shape=[1, 2], data=np.array([2, 3]).tobytes()
                ),
                cu_seqlens=ragged([2]),
            ),
            INVALID,
            "batch.input_ids.shape",
        ),
        (
            "inference",
            Infer,
            infer("tiny-embed", input_ids=ids_tensor([2, 3]), cu_seqlens=ragged([3])),
            INVALID,
            "batch.cu_seqlens",
        ),
        (
            "inference",
            Infer,
            infer(
                "tiny-embed",
                input_ids=ids_tensor([2, 3]),
                cu_seqlens=ids_tensor([0, 2, 1, 2], tensor_pb2.DATA_TYPE_INT32),
            ),
            INVALID,
            "batch.cu_seqlens",
        ),
        (
            "inference",
            Infer,
            infer("tiny-embed", input_ids=ids_tensor([2, 3]), cu_seqlens=ids_tensor([0, 2**40, 2])),
            INVALID,
            "batch.cu_seqlens",
        ),
        (
            "inference",
            Infer,
            infer(
                "tiny-embed",
                input_ids=ids_tensor([2, 3]),
                cu_seqlens=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_INT32, shape=[2], data=b"\x00" * 7),
            ),
            INVALID,
            "batch.cu_seqlens.data",
        ),
    ]
    await in_thread(fuzzing(tally, targets, lambda channels: check_cases(tally, channels, cases)))


async def test_a_request_that_does_not_parse_is_invalid_argument(gateway: Gateway) -> None:
    """Found by the fuzzing above: grpc answered UNKNOWN (unary) and the error table INTERNAL (streams)."""
    unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = gateway.channel.unary_unary(
        "/tandem.gateway.v1.GatewayService/Embed"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(b"\x00")
    d = details_of(caught.value)
    assert (d.code, d.reason, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", ["request"])
    assert "tandem.gateway.v1.EmbedRequest" in d.message
    for method in STREAM_METHODS:
        stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = gateway.channel.stream_stream(method)
        if method in ANSWERED_IN_STREAM:  # the protocol answers each request alone: the stream goes on
            (raw,) = [answer async for answer in stream(iter([b"\x00"]))]
            answer = oip.ModelStreamInferResponse.FromString(raw)
            assert answer.error_message.startswith("INVALID_ARGUMENT: the request does not parse")
            continue
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream(iter([b"\x00"])):
                pass
        d = details_of(caught.value)
        assert (d.code, d.reason, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", ["request"])
