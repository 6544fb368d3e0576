"""Proto <-> domain for the postprocess stage: the only module here that touches generated messages."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from google.protobuf.message import Message

from services.common import errors, tensors
from services.postprocess.core import Entity, FloatArray, IntArray, LabelScore, RankedDocument
from tandem.postprocess.v1 import postprocess_pb2
from tandem.tensor.v1 import tensor_pb2


def _required(message: Message, name: str, field: str) -> tensor_pb2.Tensor:
    # An unset tensor decodes as DATA_TYPE_UNSPECIFIED, which would blame "<field>.dtype"; say what is missing.
    if not message.HasField(name):
        raise errors.invalid_argument(f"{field} is required", field)
    tensor: tensor_pb2.Tensor = getattr(message, name)
    return tensor


def floats(message: Message, name: str, field: str) -> FloatArray:
    """A required FLOAT32 (or FLOAT16, widened) matrix."""
    return np.asarray(tensors.decode_as(_required(message, name, field), field, np.float32, 2), dtype=np.float32)


def int32s(message: Message, name: str, field: str, ndim: int) -> IntArray:
    """A required integer tensor as int32 (cumulative lengths, offsets)."""
    return np.asarray(tensors.decode_as(_required(message, name, field), field, np.int32, ndim), dtype=np.int32)


def mask(message: Message, name: str, field: str) -> np.ndarray[tuple[int], np.dtype[np.uint8]]:
    """A required UINT8 0/1 vector."""
    return np.asarray(tensors.decode_as(_required(message, name, field), field, np.uint8, 1), dtype=np.uint8)


def pool_response(embeddings: FloatArray) -> postprocess_pb2.PoolResponse:
    return postprocess_pb2.PoolResponse(embeddings=tensors.encode(embeddings))


def classify_response(results: Sequence[Sequence[LabelScore]]) -> postprocess_pb2.ClassifyResponse:
    return postprocess_pb2.ClassifyResponse(
        results=[
            postprocess_pb2.Classification(
                labels=[postprocess_pb2.LabelScore(label=s.label, score=s.score, index=s.index) for s in labels]
            )
            for labels in results
        ]
    )


def classify_tokens_response(results: Sequence[Sequence[Entity]]) -> postprocess_pb2.ClassifyTokensResponse:
    return postprocess_pb2.ClassifyTokensResponse(
        results=[
            postprocess_pb2.TokenClassification(
                entities=[
                    postprocess_pb2.Entity(label=e.label, score=e.score, start=e.start, end=e.end, text=e.text)
                    for e in entities
                ]
            )
            for entities in results
        ]
    )


def rerank_response(results: Sequence[RankedDocument]) -> postprocess_pb2.RerankResponse:
    return postprocess_pb2.RerankResponse(
        results=[postprocess_pb2.RankedDocument(index=d.index, score=d.score) for d in results]
    )
