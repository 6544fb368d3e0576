"""Requests and results <-> the gateway's messages, shared by the blocking and asyncio clients; the only module of
the SDK that builds or reads tandem.gateway.v1 (and tandem.generation.v1) messages."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC
from typing import Any

import grpc
import numpy as np
from google.protobuf.descriptor import EnumDescriptor

from tandem.gateway.v1 import gateway_pb2
from tandem.generation.v1 import generation_pb2
from tandem.model.v1 import model_pb2
from tandem.sdk.errors import TandemError
from tandem.sdk.types import (
    AccuracyReport,
    Derivation,
    Entity,
    FinishReason,
    GenerationDelta,
    GenerationResult,
    GenerationUsage,
    Label,
    ModelInfo,
    Provenance,
    RerankResult,
    StreamResult,
    TokenEncoding,
    TokenLogprob,
    Vectors,
)


def texts(inputs: Sequence[str], name: str = "inputs") -> list[str]:
    # A bare string is a Sequence[str] too, and would be embedded one character at a time.
    if isinstance(inputs, str):
        raise TypeError(f"{name} must be a sequence of strings, not a single string: wrap it in a list")
    return list(inputs)


# Requests


def embed_request(
    inputs: Sequence[str],
    model: str,
    normalize: bool,
    truncate: bool,
    dimensions: int | None = None,
    force_dimensions: bool = False,
    prompt_name: str = "",
) -> gateway_pb2.EmbedRequest:
    request = gateway_pb2.EmbedRequest(
        model=model,
        inputs=texts(inputs),
        normalize=normalize,
        truncate=truncate,
        force_dimensions=force_dimensions,
        prompt_name=prompt_name,
    )
    if dimensions is not None:
        request.dimensions = dimensions
    return request


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


def chat_message(message: Mapping[str, str], index: int) -> generation_pb2.ChatMessage:
    if isinstance(message, str) or "role" not in message or "content" not in message:
        raise TypeError(f"messages[{index}] must be a mapping with 'role' and 'content', like {{'role': 'user', ...}}")
    return generation_pb2.ChatMessage(role=message["role"], content=message["content"])


def generate_request(
    prompt: str | None,
    model: str,
    messages: Sequence[Mapping[str, str]] | None,
    *,
    max_new_tokens: int | None,
    min_new_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    repetition_penalty: float | None,
    seed: int | None,
    stop: Sequence[str],
    stop_token_ids: Sequence[int],
    ignore_eos: bool,
    logprobs: int,
) -> gateway_pb2.GenerateRequest:
    """The server checks the values (and that exactly one of prompt and messages is given); this checks types only."""
    if isinstance(stop, str):
        raise TypeError("stop must be a sequence of strings, not a single string: wrap it in a list")
    chat = [chat_message(m, i) for i, m in enumerate(messages or ())]
    params = generation_pb2.GenerationParams(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
    )
    return gateway_pb2.GenerateRequest(model=model, prompt=prompt or "", messages=chat, params=params)


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
        context_length=info.context_length,
        chat_template=info.chat_template,
        provenance=provenance(info.provenance) if info.HasField("provenance") else None,
    )


def _optional(message: model_pb2.Derivation | model_pb2.AccuracyReport, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None  # type: ignore[arg-type]


def _enum_name(enum: EnumDescriptor, value: int, prefix: str) -> str:
    """An enum value as the SDK spells it ("int8", "prune"); a value newer than this SDK as its number."""
    known = enum.values_by_number.get(value)
    return known.name.removeprefix(prefix).lower() if known is not None else str(value)


def provenance(message: model_pb2.Provenance) -> Provenance:
    derivation = accuracy = None
    if message.HasField("derivation"):
        made = message.derivation
        derivation = Derivation(
            method=_enum_name(model_pb2.DerivationMethod.DESCRIPTOR, made.method, "DERIVATION_METHOD_"),
            parent=made.parent,
            parameters={name: json.loads(value) for name, value in made.parameters.items()},
            corpus=made.corpus,
            corpus_sha256=made.corpus_sha256,
            corpus_texts=made.corpus_texts,
            seconds=made.seconds,
            steps=_optional(made, "steps"),
            parameter_count=_optional(made, "parameter_count"),
            parent_parameter_count=_optional(made, "parent_parameter_count"),
        )
    if message.HasField("accuracy"):
        report = message.accuracy
        accuracy = AccuracyReport(
            reference=report.reference,
            texts=report.texts,
            min_cosine=_optional(report, "min_cosine"),
            mean_cosine=_optional(report, "mean_cosine"),
            top1_agreement=_optional(report, "top1_agreement"),
            max_probability_difference=_optional(report, "max_probability_difference"),
        )
    return Provenance(
        source=message.source,
        derived_from=message.derived_from or None,
        precision=_enum_name(model_pb2.Precision.DESCRIPTOR, message.precision, "PRECISION_"),
        created=message.create_time.ToDatetime(tzinfo=UTC) if message.HasField("create_time") else None,
        derivation=derivation,
        accuracy=accuracy,
    )


def stream_result(response: gateway_pb2.EmbedStreamResponse) -> StreamResult:
    if response.HasField("error"):
        return StreamResult(response.id, error=TandemError.from_stream_error(response.error))
    return StreamResult(response.id, embeddings=vectors(response.response))


_FINISH_REASONS: dict[int, FinishReason] = {
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}


def generation_delta(response: gateway_pb2.GenerateResponse) -> GenerationDelta:
    logprobs = [
        TokenLogprob(p.token_id, p.logprob, [(t.token_id, t.logprob) for t in p.top]) for p in response.logprobs
    ]
    finish_reason = _FINISH_REASONS.get(response.finish_reason)
    if finish_reason is None:
        return GenerationDelta(response.text, list(response.token_ids), logprobs, model=response.model)
    return GenerationDelta(
        response.text,
        list(response.token_ids),
        logprobs,
        finish_reason=finish_reason,
        stop_sequence=response.stop_sequence or None,
        # STOP_SEQUENCE without a stop string was a stop_token_ids entry, whose id may be 0.
        stop_token_id=None if finish_reason != "stop_sequence" or response.stop_sequence else response.stop_token_id,
        usage=GenerationUsage(response.usage.prompt_tokens, response.usage.generated_tokens),
        model=response.model,
        model_version=response.model_version,
    )


class GenerationCollector:
    """Joins the deltas of one generation into a GenerationResult (generate_text of both clients)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.last: GenerationDelta | None = None

    def add(self, delta: GenerationDelta) -> None:
        self.text.append(delta.text)
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        self.last = delta

    def result(self) -> GenerationResult:
        last = self.last
        if last is None or last.finish_reason is None or last.usage is None:
            raise TandemError(grpc.StatusCode.INTERNAL, "the Generate stream ended without its last message")
        return GenerationResult(
            "".join(self.text),
            self.token_ids,
            self.logprobs,
            last.finish_reason,
            last.usage,
            stop_sequence=last.stop_sequence,
            stop_token_id=last.stop_token_id,
            model=last.model,
            model_version=last.model_version,
        )
