"""The SDK's typed results: plain dataclasses and numpy arrays, never generated messages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tandem.sdk.errors import TandemError

__all__ = ["Entity", "Label", "ModelInfo", "RerankResult", "StreamResult", "TokenEncoding", "Vectors"]

Vectors = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Label:
    """A label and its score (softmax probability, or sigmoid for multi-label models)."""

    label: str
    score: float


@dataclass(frozen=True)
class Entity:
    """A tagged span; start and end (exclusive) count Unicode code points, like Python's str indices."""

    label: str
    score: float
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class RerankResult:
    """A document's index in the request, its relevance in [0, 1], and its text when asked for."""

    index: int
    score: float
    document: str = ""


@dataclass(frozen=True)
class TokenEncoding:
    """One tokenized input; offsets are (start, end) code-point spans, (0, 0) for special tokens."""

    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    special: list[bool]


@dataclass(frozen=True)
class ModelInfo:
    """A served model; task is "embedding", "classification", "token-classification" or "rerank"."""

    name: str
    task: str
    version: str
    versions: list[str]
    max_input_length: int
    embedding_dimension: int
    labels: list[str]
    ready: bool
    backend: str
    multi_label: bool


@dataclass(frozen=True)
class StreamResult:
    """The answer to one EmbedStream request: its id and either embeddings or the error of that request alone."""

    id: str
    embeddings: Vectors | None = None
    error: TandemError | None = None
