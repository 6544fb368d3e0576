"""Public API protos <-> the pipeline's arguments and results: the gateway's only use of gateway_pb2."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from gateway.core import Classifications, Embeddings, Encodings, Ranking, Served, TokenClassifications
from gateway.generation import ChatMessage, GeneratedText
from services.common import errors
from tandem.gateway.v1 import gateway_pb2
from tandem.generation.v1 import generation_pb2


def _usage(served: Served) -> gateway_pb2.Usage:
    return gateway_pb2.Usage(prompt_tokens=served.prompt_tokens, total_tokens=served.prompt_tokens)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _embedding_rows(vectors: npt.NDArray[np.float32]) -> bytes:
    """`EmbedResponse.embeddings` (field 1) in wire format, each `Embedding.values` (field 1) a packed float run.

    A packed repeated float is the row's little-endian float32 bytes behind a tag and a length, so the vectors go
    out as one memory copy each instead of one Python float per element (32 x 384 floats: 19 us instead of 385).
    """
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    if rows.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got shape {list(rows.shape)}")
    width = rows.shape[1] * 4
    inner = b"\x0a" + _varint(width)  # Embedding.values: field 1, length-delimited (packed)
    head = b"\x0a" + _varint(len(inner) + width) + inner  # EmbedResponse.embeddings: field 1, length-delimited
    return b"".join(head + row.tobytes() for row in rows)


def embed_response(result: Embeddings) -> gateway_pb2.EmbedResponse:
    response = gateway_pb2.EmbedResponse.FromString(_embedding_rows(result.vectors))
    response.model = result.served.model
    response.model_version = result.served.version
    response.usage.CopyFrom(_usage(result.served))
    return response


def classify_response(result: Classifications) -> gateway_pb2.ClassifyResponse:
    return gateway_pb2.ClassifyResponse(
        results=[
            gateway_pb2.Classification(
                labels=[gateway_pb2.LabelScore(label=s.label, score=s.score) for s in item.labels]
            )
            for item in result.results
        ],
        model=result.served.model,
        model_version=result.served.version,
        usage=_usage(result.served),
    )


def classify_tokens_response(result: TokenClassifications) -> gateway_pb2.ClassifyTokensResponse:
    return gateway_pb2.ClassifyTokensResponse(
        results=[
            gateway_pb2.TokenClassification(
                entities=[
                    gateway_pb2.Entity(label=e.label, score=e.score, start=e.start, end=e.end, text=e.text)
                    for e in item.entities
                ]
            )
            for item in result.results
        ],
        model=result.served.model,
        model_version=result.served.version,
        usage=_usage(result.served),
    )


def rerank_response(result: Ranking, documents: list[str], return_documents: bool) -> gateway_pb2.RerankResponse:
    return gateway_pb2.RerankResponse(
        results=[
            gateway_pb2.RerankResult(
                index=r.index, score=r.score, document=documents[r.index] if return_documents else ""
            )
            for r in result.results
        ],
        model=result.served.model,
        model_version=result.served.version,
        usage=_usage(result.served),
    )


def tokenize_response(result: Encodings) -> gateway_pb2.TokenizeResponse:
    encodings = []
    for ids, tokens, offsets, special in zip(result.ids, result.tokens, result.offsets, result.special, strict=True):
        encodings.append(
            gateway_pb2.Encoding(
                ids=ids.tolist(),
                tokens=tokens,
                offsets=[gateway_pb2.Offset(start=s, end=e) for s, e in offsets.tolist()],
                special=[bool(x) for x in special.tolist()],
            )
        )
    return gateway_pb2.TokenizeResponse(encodings=encodings, model=result.model)


def stream_error(err: errors.TandemError) -> gateway_pb2.StreamError:
    """A failed stream request's error, with what the rich status of a unary call would carry."""
    from google.rpc import error_details_pb2

    status = err.to_status_proto()
    reason = ""
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return gateway_pb2.StreamError(code=status.code, message=status.message, reason=reason, fields=fields)


def chat_messages(request: gateway_pb2.GenerateRequest) -> list[ChatMessage]:
    return [ChatMessage(m.role, m.content) for m in request.messages]


def generate_response(message: GeneratedText) -> gateway_pb2.GenerateResponse:
    response = gateway_pb2.GenerateResponse(
        text=message.text, token_ids=message.token_ids, logprobs=message.logprobs, model=message.model
    )
    if message.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED:
        response.finish_reason = message.finish_reason
        response.stop_sequence = message.stop_sequence
        response.stop_token_id = message.stop_token_id
        response.model_version = message.version
        response.usage.CopyFrom(
            gateway_pb2.Usage(
                prompt_tokens=message.prompt_tokens,
                generated_tokens=message.generated_tokens,
                total_tokens=message.prompt_tokens + message.generated_tokens,
            )
        )
    return response
