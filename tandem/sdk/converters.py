"""Requests and results <-> the gateway's messages, shared by the blocking and asyncio clients; the only module of
the SDK that builds or reads tandem.gateway.v1 messages."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from tandem.gateway.v1 import gateway_pb2
from tandem.model.v1 import model_pb2
from tandem.sdk.errors import TandemError
from tandem.sdk.types import Entity, Label, ModelInfo, RerankResult, StreamResult, TokenEncoding, Vectors


def texts(inputs: Sequence[str], name: str = "inputs") -> list[str]:
    # A bare string is a Sequence[str] too, and would be embedded one character at a time.
    if isinstance(inputs, str):
        raise TypeError(f"{name} must be a sequence of strings, not a single string: wrap it in a list")
    return list(inputs)


# Requests


def embed_request(inputs: Sequence[str], model: str, normalize: bool, truncate: bool) -> gateway_pb2.EmbedRequest:
    return gateway_pb2.EmbedRequest(model=model, inputs=texts(inputs), normalize=normalize, truncate=truncate)


def classify_request(inputs: Sequence[str], model: str, top_k: int, truncate: bool) -> gateway_pb2.ClassifyRequest:
    return gateway_pb2.ClassifyRequest(model=model, inputs=texts(inputs), top_k=top_k, truncate=truncate)


def classify_tokens_request(inputs: Sequence[str], model: str, truncate: bool) -> gateway_pb2.ClassifyTokensRequest:
    return gateway_pb2.ClassifyTokensRequest(model=model, inputs=texts(inputs), truncate=truncate)


def rerank_request(
    query: str, documents: Sequence[str], model: str, top_n: int, return_documents: bool, truncate: bool
) -> gateway_pb2.RerankRequest:
    return gateway_pb2.RerankRequest(
        model=model,
        query=query,
        documents=texts(documents, "documents"),
        top_n=top_n,
        return_documents=return_documents,
        truncate=truncate,
    )


def tokenize_request(
    inputs: Sequence[str], model: str, add_special_tokens: bool, truncate: bool
) -> gateway_pb2.TokenizeRequest:
    return gateway_pb2.TokenizeRequest(
        model=model, inputs=texts(inputs), add_special_tokens=add_special_tokens, truncate=truncate
    )


def detokenize_request(ids: Sequence[int], model: str, skip_special_tokens: bool) -> gateway_pb2.DetokenizeRequest:
    return gateway_pb2.DetokenizeRequest(model=model, ids=list(ids), skip_special_tokens=skip_special_tokens)


def stream_request(
    request_id: str, inputs: Sequence[str], model: str, normalize: bool, truncate: bool
) -> gateway_pb2.EmbedStreamRequest:
    return gateway_pb2.EmbedStreamRequest(id=request_id, request=embed_request(inputs, model, normalize, truncate))


def stream_requests(
    requests: Iterable[tuple[str, Sequence[str]]], model: str, normalize: bool, truncate: bool
) -> Iterator[gateway_pb2.EmbedStreamRequest]:
    for request_id, inputs in requests:
        yield stream_request(request_id, inputs, model, normalize, truncate)


# Results


def vectors(response: gateway_pb2.EmbedResponse) -> Vectors:
    return np.array([e.values for e in response.embeddings], dtype=np.float32)


def labels(response: gateway_pb2.ClassifyResponse) -> list[list[Label]]:
    return [[Label(s.label, s.score) for s in r.labels] for r in response.results]


def entities(response: gateway_pb2.ClassifyTokensResponse) -> list[list[Entity]]:
    return [[Entity(e.label, e.score, e.start, e.end, e.text) for e in r.entities] for r in response.results]


def ranked(response: gateway_pb2.RerankResponse) -> list[RerankResult]:
    return [RerankResult(r.index, r.score, r.document) for r in response.results]


def encodings(response: gateway_pb2.TokenizeResponse) -> list[TokenEncoding]:
    return [
        TokenEncoding(list(e.ids), list(e.tokens), [(o.start, o.end) for o in e.offsets], list(e.special))
        for e in response.encodings
    ]


def model_info(info: model_pb2.ModelInfo) -> ModelInfo:
    task = model_pb2.Task.Name(info.task).removeprefix("TASK_").lower().replace("_", "-")
    return ModelInfo(
        name=info.name,
        task=task,
        version=info.version,
        versions=list(info.versions),
        max_input_length=info.max_input_length,
        embedding_dimension=info.embedding_dimension,
        labels=list(info.labels),
        ready=info.ready,
        backend=info.backend,
        multi_label=info.multi_label,
    )


def stream_result(response: gateway_pb2.EmbedStreamResponse) -> StreamResult:
    if response.HasField("error"):
        return StreamResult(response.id, error=TandemError.from_stream_error(response.error))
    return StreamResult(response.id, embeddings=vectors(response.response))
