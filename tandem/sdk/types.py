"""The SDK's typed results: plain dataclasses and numpy arrays, never generated messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from tandem.sdk.errors import TandemError

__all__ = [
    "AccuracyReport",
    "Derivation",
    "Entity",
    "FinishReason",
    "GenerationDelta",
    "GenerationResult",
    "GenerationUsage",
    "Label",
    "ModelInfo",
    "Provenance",
    "RerankResult",
    "StreamResult",
    "TokenEncoding",
    "TokenLogprob",
    "Vectors",
]

Vectors = npt.NDArray[np.float32]

# Why a generation ended: an end-of-sequence token ("stop"), max_new_tokens or a full context ("length"), or a stop
# string or one of stop_token_ids ("stop_sequence").
FinishReason = Literal["stop", "length", "stop_sequence"]


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
class Derivation:
    """How a pruned or distilled version was made: method "prune" or "distill", the parent (the teacher) as
    name:version, the command's settings (kept layers, sizes, learning rate, seed...), the corpus (a file or
    "builtin:python-docs") with its SHA-256 and number of texts, training steps (distillation), seconds taken, and
    the parameter counts of the version and its parent."""

    method: str
    parent: str
    parameters: dict[str, Any]
    corpus: str
    corpus_sha256: str
    corpus_texts: int
    seconds: float
    steps: int | None = None
    parameter_count: int | None = None
    parent_parameter_count: int | None = None


@dataclass(frozen=True)
class AccuracyReport:
    """How closely a derived version reproduces the original model (reference, as name:version) on `texts` held-out
    texts: cosines for embedding models, top-1 agreement and the largest probability difference for the others."""

    reference: str
    texts: int
    min_cosine: float | None = None
    mean_cosine: float | None = None
    top1_agreement: float | None = None
    max_probability_difference: float | None = None


@dataclass(frozen=True)
class Provenance:
    """How a version was made, from the metadata.json `tandem models` wrote: where it came from, the version it was
    derived from (None for one added from a folder), its precision ("fp32", "fp16" or "int8"), when it was created,
    and for pruned or distilled versions how (derivation) and for derived ones their accuracy."""

    source: str
    derived_from: str | None
    precision: str
    created: datetime | None = None
    derivation: Derivation | None = None
    accuracy: AccuracyReport | None = None


@dataclass(frozen=True)
class ModelInfo:
    """A served model; task is "embedding", "classification", "token-classification", "rerank" or
    "text-generation". context_length and chat_template (whether generate takes messages) are set for text-generation
    models only. provenance says how the serving version was made; None for a version folder made by hand."""

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
    context_length: int = 0
    chat_template: bool = False
    provenance: Provenance | None = None


@dataclass(frozen=True)
class StreamResult:
    """The answer to one EmbedStream request: its id and either embeddings or the error of that request alone."""

    id: str
    embeddings: Vectors | None = None
    error: TandemError | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability, and the most likely tokens of its step as (token id, logprob), best
    first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class GenerationUsage:
    """Token counts of one generation: the prompt's (special tokens and chat template included) and the answer's."""

    prompt_tokens: int
    generated_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens


@dataclass(frozen=True)
class GenerationDelta:
    """One message of a generation: new text (never a split character), its token ids and, when asked for, their
    log-probabilities. The last delta has finish_reason, usage and model_version set; stop_sequence names the stop
    string and stop_token_id the stop_token_ids entry that ended it, if one did."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_sequence: str | None = None
    stop_token_id: int | None = None
    usage: GenerationUsage | None = None
    model: str = ""
    model_version: str = ""


@dataclass(frozen=True)
class GenerationResult:
    """A whole generation (generate_text): the deltas joined, and what the last one said."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: FinishReason
    usage: GenerationUsage
    stop_sequence: str | None = None
    stop_token_id: int | None = None
    model: str = ""
    model_version: str = ""
