"""Postprocess domain: model outputs as numpy arrays to embeddings, ranked labels, entities and relevance scores."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import tokenizers

from services.common import errors
from services.common.errors import Reason
from services.common.pooling import check_pooling, pool_ragged
from services.common.repository import ModelRepository, ModelVersion, Task
from services.postprocess.detokenize import IncrementalDetokenizer, TextDelta

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int32]

T = TypeVar("T")

# Up to this many input elements a request is handled on the event loop: vectorised numpy over them takes well
# under a millisecond, about the cost of a hop to a thread. Larger requests go to a worker thread.
_INLINE_ELEMENTS = 1 << 16
# Entities are built one Python object each, so token classification also stays inline only for short batches.
_INLINE_TOKENS = 2048

# Stop strings per generation, and their length: matching scans the held-back text for each one at every step.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# Prompt ids that seed a detokenizer's window: enough for the first generated token's leading space.
PROMPT_CONTEXT_IDS = 8

# What torch.nn.functional.normalize clamps the norm to.
_MIN_NORM = 1e-12


@dataclass(frozen=True)
class LabelScore:
    """One label of a sequence and its probability."""

    label: str
    score: float
    index: int


@dataclass(frozen=True)
class Entity:
    """A span of the input text tagged with an entity type; start and end are code point offsets."""

    label: str
    score: float
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class RankedDocument:
    """One document's relevance; index is its position in the request."""

    index: int
    score: float


def softmax(logits: FloatArray) -> FloatArray:
    """Row-wise softmax in float32, computed the way TokenClassificationPipeline does (max shift, then exp)."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs: FloatArray = (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32, copy=False)
    return probs


def sigmoid(logits: FloatArray) -> FloatArray:
    """Element-wise logistic function; exp only of non-positive numbers, so large logits cannot overflow."""
    e = np.exp(-np.abs(logits))
    probs: FloatArray = np.where(logits >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32, copy=False)
    return probs


def l2_normalize(rows: npt.NDArray[np.floating]) -> FloatArray:
    """Rows scaled to unit L2 norm, with torch.nn.functional.normalize's epsilon so zero rows stay zero."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit: FloatArray = (rows / np.maximum(norms, _MIN_NORM)).astype(np.float32, copy=False)
    return unit


class EmbeddingPostprocessor:
    """Pools the token rows of each sequence into one sentence embedding, as sentence-transformers' Pooling does.

    Sequences are ragged: sequence i is rows cu_seqlens[i]:cu_seqlens[i+1]. Every row is a real token (there is no
    padding), so sentence-transformers' masked mean is the plain mean over the sequence's rows. Callers must pass
    non-empty sequences: np.*.reduceat gives the row at the index, not an empty reduction, for a zero-length segment.
    """

    def __init__(self, pooling: str) -> None:
        self.pooling = check_pooling(pooling)

    def pool(
        self, token_embeddings: FloatArray, cu_seqlens: IntArray, normalize: bool = False, dimensions: int = 0
    ) -> FloatArray:
        pooled = pool_ragged(token_embeddings, cu_seqlens, self.pooling)
        return finish_embeddings(pooled, normalize, dimensions)


def finish_embeddings(pooled: FloatArray, normalize: bool, dimensions: int = 0) -> FloatArray:
    """Sentence embeddings cut to their first `dimensions` values (Matryoshka truncation; 0 keeps all), then scaled
    to unit norm with `normalize`, as sentence-transformers' truncate_dim does."""
    if 0 < dimensions < pooled.shape[1]:
        pooled = np.ascontiguousarray(pooled[:, :dimensions])
    return l2_normalize(pooled) if normalize else pooled


def _check_dimensions(dimensions: int, size: int) -> None:
    if dimensions < 0 or (size and dimensions > size):
        raise errors.invalid_argument(
            f"dimensions must be between 1 and the model's embedding size {size}, got {dimensions}", "dimensions"
        )


class SequenceClassificationPostprocessor:
    """Sequence logits to labels with probabilities, best first: softmax, or an independent sigmoid per label for
    multi-label models (problem_type "multi_label_classification"), as the text-classification pipeline does."""

    def __init__(self, labels: Sequence[str], multi_label: bool = False) -> None:
        self.labels = tuple(labels)
        self.multi_label = multi_label

    def probabilities(self, logits: FloatArray) -> FloatArray:
        return sigmoid(logits) if self.multi_label else softmax(logits)

    def classify(self, logits: FloatArray, top_k: int = 0) -> list[list[LabelScore]]:
        """One ranked list per row of logits [n, len(labels)]; top_k 0 keeps every label."""
        probs = self.probabilities(logits)
        # Stable, so equal probabilities keep label order, as Python's sorted() does in the reference pipeline.
        order = np.argsort(-probs, axis=1, kind="stable")
        if top_k > 0:
            order = order[:, :top_k]
        ranked = np.take_along_axis(probs, order, axis=1)
        return [
            [LabelScore(self.labels[i], s, i) for i, s in zip(indices, scores, strict=True)]
            for indices, scores in zip(order.tolist(), ranked.tolist(), strict=True)
        ]


def _tag(label: str) -> tuple[bool, str]:
    """(begins an entity, entity type) of a label, as TokenClassificationPipeline.get_tag reads B-/I- prefixes."""
    if label.startswith("B-"):
        return True, label[2:]
    if label.startswith("I-"):
        return False, label[2:]
    # Not in B-/I- form (such as "O"): a continuation of whatever has the same label.
    return False, label


class TokenClassificationPostprocessor:
    """Token logits to entities: transformers' TokenClassificationPipeline with aggregation_strategy="simple".

    Per token: softmax, then the argmax label and its probability; special tokens are skipped. Consecutive remaining
    tokens of one sequence join a group while their entity type stays the same and no B- label starts a new one
    (`group_entities`). A group is named after its first token's label with the prefix removed
    (`group_sub_entities`), and groups named in ignore_labels ("O") are dropped. An entity's score is the mean of its
    tokens' probabilities; it spans from its first token's start offset to its last token's end offset.
    """

    def __init__(self, labels: Sequence[str], ignore_labels: Sequence[str] = ("O",)) -> None:
        self.labels = tuple(labels)
        tags = [_tag(label) for label in self.labels]
        type_ids: dict[str, int] = {}
        self._begins = np.array([begins for begins, _ in tags], dtype=bool)
        self._type = np.array([type_ids.setdefault(t, len(type_ids)) for _, t in tags], dtype=np.int64)
        # The pipeline names a group with split("-", 1)[-1], which differs from get_tag for labels like "E-PER".
        self._group_names = [label.split("-", 1)[-1] for label in self.labels]
        self._kept = np.array([name not in ignore_labels for name in self._group_names], dtype=bool)

    def entities(
        self,
        logits: FloatArray,
        cu_seqlens: IntArray,
        offsets: IntArray,
        special_tokens_mask: npt.NDArray[np.uint8],
        texts: Sequence[str],
    ) -> list[list[Entity]]:
        """Entities per sequence in text order; offsets [total_tokens, 2] index into the sequence's text."""
        count = len(cu_seqlens) - 1
        results: list[list[Entity]] = [[] for _ in range(count)]
        probs = softmax(logits)
        label_ids = probs.argmax(axis=1)
        scores = np.take_along_axis(probs, label_ids[:, None], axis=1)[:, 0]
        sequence = np.repeat(np.arange(count), np.diff(cu_seqlens))
        kept = special_tokens_mask == 0
        label_ids, scores, sequence, spans = label_ids[kept], scores[kept], sequence[kept], offsets[kept]
        if len(label_ids) == 0:
            return results
        # A token starts a group at the start of its sequence, when the entity type changes, or on any B- label.
        starts_group = np.ones(len(label_ids), dtype=bool)
        types = self._type[label_ids]
        starts_group[1:] = (sequence[1:] != sequence[:-1]) | (types[1:] != types[:-1]) | self._begins[label_ids[1:]]
        first = np.flatnonzero(starts_group)
        last = np.append(first[1:], len(label_ids)) - 1
        means = np.add.reduceat(scores, first, dtype=np.float64) / (last - first + 1)
        group_labels = label_ids[first]
        for g in np.flatnonzero(self._kept[group_labels]).tolist():
            i = int(sequence[first[g]])
            start, end = int(spans[first[g], 0]), int(spans[last[g], 1])
            name = self._group_names[int(group_labels[g])]
            results[i].append(Entity(name, float(means[g]), start, end, texts[i][start:end]))
        return results


class RerankPostprocessor:
    """Pair logits to relevance, best first: sigmoid of a cross-encoder's single logit, or the probability of the
    "relevant" class (index 1) of a two-class pair classifier."""

    def scores(self, logits: FloatArray) -> FloatArray:
        if logits.shape[1] == 1:
            return sigmoid(logits[:, 0])
        return softmax(logits)[:, 1]

    def rank(self, logits: FloatArray, top_n: int = 0) -> list[RankedDocument]:
        """Documents best first; top_n 0 keeps all. Equal scores keep request order."""
        scores = self.scores(logits)
        order = np.argsort(-scores, kind="stable")
        if top_n > 0:
            order = order[:top_n]
        return [RankedDocument(i, s) for i, s in zip(order.tolist(), scores[order].tolist(), strict=True)]


# ----------------------------------------------------------------------------------------------------------------------
# Validation: everything a request can get wrong becomes INVALID_ARGUMENT naming the request field.


def _require_finite(array: npt.NDArray[np.floating], field: str) -> None:
    if not bool(np.isfinite(array).all()):
        raise errors.invalid_argument(f"{field} contains NaN or infinite values", field)


def _require_rows(array: npt.NDArray[np.generic], rows: int, field: str, what: str) -> None:
    if array.shape[0] != rows:
        raise errors.invalid_argument(f"{field} has {array.shape[0]} rows but {what} says {rows}", field)


def _require_embeddings(rows: FloatArray, count: int, model: ModelVersion, field: str) -> None:
    """Embedding rows (token or pooled): as many as cu_seqlens says, the model's width, and finite."""
    _require_rows(rows, count, field, "cu_seqlens")
    if model.hidden_size and rows.shape[1] != model.hidden_size:
        raise errors.invalid_argument(
            f"{field} has {rows.shape[1]} columns but model {model.name}:{model.version} has hidden size"
            f" {model.hidden_size}",
            field,
        )
    _require_finite(rows, field)


def _check_cu_seqlens(cu_seqlens: IntArray, field: str) -> IntArray:
    """Cumulative lengths: at least one sequence, starting at 0 and never decreasing. The token tensors are then
    checked against its last entry, so that a mismatch names the tensor rather than cu_seqlens."""
    if cu_seqlens.ndim != 1 or len(cu_seqlens) < 2:
        raise errors.invalid_argument(f"{field} needs at least two entries (one sequence)", field)
    if cu_seqlens[0] != 0 or bool(np.any(np.diff(cu_seqlens) < 0)):
        raise errors.invalid_argument(f"{field} must start at 0 and never decrease", field)
    return cu_seqlens


def _check_top(value: int, field: str) -> None:
    if value < 0:
        raise errors.invalid_argument(f"{field} must be 0 (keep all) or positive, got {value}", field)


def _check_label_columns(logits: FloatArray, model: ModelVersion, field: str) -> None:
    if logits.shape[1] != len(model.labels):
        raise errors.invalid_argument(
            f"{field} has {logits.shape[1]} columns but model {model.name}:{model.version} has"
            f" {len(model.labels)} labels",
            field,
        )


def _check_not_empty(array: npt.NDArray[np.generic], field: str) -> None:
    if array.shape[0] == 0:
        raise errors.invalid_argument(f"{field} has no rows; at least one input is required", field)


class Postprocessor:
    """The postprocess stage: resolves the model version that produced the outputs, checks the outputs against it,
    and runs the postprocessor for its task."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository
        # Text-generation versions' tokenizers (tokenizer.json), loaded once each.
        self._tokenizers: dict[tuple[str, str], tokenizers.Tokenizer] = {}
        self._tokenizers_lock = threading.Lock()

    def preload(self) -> None:
        """Reads every model's newest version so that broken models show in the log at start, not at first call."""
        for name in self.repository.names():
            try:
                self.repository.resolve(name)
            except errors.TandemError as exc:
                log.error("cannot read model %s: %s", name, exc)

    def _model(self, model: str, version: str, task: Task) -> ModelVersion:
        if version and not version.isdigit():
            raise errors.invalid_argument(f"version must be a number, got {version!r}", "version")
        resolved = self.repository.resolve(f"{model}:{version}" if version else model)
        if resolved.task != task:
            raise errors.invalid_argument(
                f"model {resolved.name}:{resolved.version} is for {resolved.task.value}, not {task.value}",
                "model",
                reason=Reason.WRONG_TASK,
                model=resolved.name,
                task=resolved.task.value,
            )
        return resolved

    def generation_tokenizer(self, model: ModelVersion) -> tokenizers.Tokenizer | None:
        """The version's tokenizer when it is loaded already."""
        return self._tokenizers.get((model.name, model.version))

    def load_generation_tokenizer(self, model: ModelVersion) -> tokenizers.Tokenizer:
        """Worker thread: the version's tokenizer.json, loaded once (FAILED_PRECONDITION when it is unusable)."""
        key = (model.name, model.version)
        with self._tokenizers_lock:
            loaded = self._tokenizers.get(key)
            if loaded is None:
                try:
                    loaded = tokenizers.Tokenizer.from_file(str(model.path / "tokenizer.json"))
                except Exception as exc:
                    raise errors.failed_precondition(
                        f"model {model.ref} has no usable tokenizer.json: {exc}",
                        reason=Reason.TOKENIZER_BROKEN,
                        model=model.name,
                    ) from exc
                self._tokenizers[key] = loaded
        return loaded

    async def detokenization(
        self, model: str, version: str, prompt_ids: Sequence[int], stop: Sequence[str], skip_special: bool
    ) -> Detokenization:
        """A detokenizer for one sequence of a text-generation model, after checking the stop strings."""
        if len(stop) > MAX_STOP_STRINGS:
            raise errors.invalid_argument(f"{len(stop)} stop strings; at most {MAX_STOP_STRINGS}", "stop")
        for i, text in enumerate(stop):
            if not text or len(text) > MAX_STOP_CHARS:
                raise errors.invalid_argument(
                    f"stop string {i} must have 1 to {MAX_STOP_CHARS} characters, it has {len(text)}", f"stop[{i}]"
                )
        resolved = self._model(model, version, Task.TEXT_GENERATION)
        tokenizer = self.generation_tokenizer(resolved)
        if tokenizer is None:
            tokenizer = await asyncio.to_thread(self.load_generation_tokenizer, resolved)
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        context = [i for i in prompt_ids[-PROMPT_CONTEXT_IDS:] if 0 <= i < vocab]
        decoder = IncrementalDetokenizer(tokenizer, prompt_ids=context, stop=stop, skip_special_tokens=skip_special)
        return Detokenization(decoder, vocab)

    @staticmethod
    async def _run(inline: bool, work: Callable[[], T]) -> T:
        if inline:
            return work()
        return await asyncio.to_thread(work)

    async def pool(
        self,
        model: str,
        version: str,
        token_embeddings: FloatArray,
        cu_seqlens: IntArray,
        normalize: bool,
        dimensions: int = 0,
    ) -> FloatArray:
        """Sentence embeddings [n, dim] from token embeddings [total_tokens, dim], pooled as the model says."""

        def work() -> FloatArray:
            resolved = self._model(model, version, Task.EMBEDDING)
            cu = _check_cu_seqlens(cu_seqlens, "cu_seqlens")
            if bool(np.any(np.diff(cu) == 0)):
                raise errors.invalid_argument(
                    "cu_seqlens has an empty sequence; every sequence needs at least one token", "cu_seqlens"
                )
            _require_embeddings(token_embeddings, int(cu[-1]), resolved, "token_embeddings")
            _check_dimensions(dimensions, resolved.hidden_size)
            return EmbeddingPostprocessor(resolved.pooling).pool(token_embeddings, cu, normalize, dimensions)

        return await self._run(token_embeddings.size <= _INLINE_ELEMENTS, work)

    async def finish_pooled(
        self,
        model: str,
        version: str,
        embeddings: FloatArray,
        cu_seqlens: IntArray,
        normalize: bool,
        dimensions: int = 0,
    ) -> FloatArray:
        """Sentence embeddings [n, dim] the inference stage already pooled: checked, and scaled with normalize."""

        def work() -> FloatArray:
            resolved = self._model(model, version, Task.EMBEDDING)
            cu = _check_cu_seqlens(cu_seqlens, "cu_seqlens")
            _require_embeddings(embeddings, len(cu) - 1, resolved, "pooled_embeddings")
            _check_dimensions(dimensions, resolved.hidden_size)
            return finish_embeddings(embeddings, normalize, dimensions)

        return await self._run(embeddings.size <= _INLINE_ELEMENTS, work)

    async def classify(self, model: str, version: str, logits: FloatArray, top_k: int) -> list[list[LabelScore]]:
        """Ranked labels per row of logits [n, num_labels]."""

        def work() -> list[list[LabelScore]]:
            resolved = self._model(model, version, Task.CLASSIFICATION)
            _check_top(top_k, "top_k")
            _check_not_empty(logits, "logits")
            _check_label_columns(logits, resolved, "logits")
            _require_finite(logits, "logits")
            return SequenceClassificationPostprocessor(resolved.labels, resolved.multi_label).classify(logits, top_k)

        return await self._run(logits.size <= _INLINE_ELEMENTS, work)

    async def classify_tokens(
        self,
        model: str,
        version: str,
        logits: FloatArray,
        cu_seqlens: IntArray,
        offsets: IntArray,
        special_tokens_mask: npt.NDArray[np.uint8],
        texts: Sequence[str],
    ) -> list[list[Entity]]:
        """Entities per text from token logits [total_tokens, num_labels] and the tokens' offsets and special mask."""

        def work() -> list[list[Entity]]:
            resolved = self._model(model, version, Task.TOKEN_CLASSIFICATION)
            cu = _check_cu_seqlens(cu_seqlens, "batch.cu_seqlens")
            total = int(cu[-1])
            _require_rows(logits, total, "logits", "batch.cu_seqlens")
            _check_label_columns(logits, resolved, "logits")
            _require_finite(logits, "logits")
            if offsets.ndim != 2 or offsets.shape[1] != 2:
                raise errors.invalid_argument(
                    f"batch.offsets must have shape [total_tokens, 2], got {list(offsets.shape)}", "batch.offsets"
                )
            _require_rows(offsets, total, "batch.offsets", "batch.cu_seqlens")
            _require_rows(special_tokens_mask, total, "batch.special_tokens_mask", "batch.cu_seqlens")
            if len(texts) != len(cu) - 1:
                raise errors.invalid_argument(
                    f"{len(texts)} texts for {len(cu) - 1} sequences; give one text per sequence", "texts"
                )
            # Offsets must lie inside their own text, or entity texts would be silently cut short.
            text_lengths = np.repeat(np.array([len(t) for t in texts], dtype=np.int64), np.diff(cu))
            starts, ends = offsets[:, 0], offsets[:, 1]
            if bool(np.any((starts < 0) | (starts > ends) | (ends > text_lengths))):
                raise errors.invalid_argument(
                    "batch.offsets has a span outside its text (offsets are code points into texts)", "batch.offsets"
                )
            return TokenClassificationPostprocessor(resolved.labels).entities(
                logits, cu, offsets, special_tokens_mask, texts
            )

        return await self._run(logits.size <= _INLINE_ELEMENTS and logits.shape[0] <= _INLINE_TOKENS, work)

    async def rerank(self, model: str, version: str, logits: FloatArray, top_n: int) -> list[RankedDocument]:
        """Documents best first from pair logits [n, 1] or [n, 2]."""

        def work() -> list[RankedDocument]:
            resolved = self._model(model, version, Task.RERANK)
            _check_top(top_n, "top_n")
            _check_not_empty(logits, "logits")
            if logits.shape[1] not in (1, 2):
                raise errors.invalid_argument(
                    f"logits must have 1 column (a relevance logit) or 2 (a pair classifier), got {logits.shape[1]}",
                    "logits",
                )
            if resolved.labels:
                _check_label_columns(logits, resolved, "logits")
            _require_finite(logits, "logits")
            return RerankPostprocessor().rank(logits, top_n)

        return await self._run(logits.size <= _INLINE_ELEMENTS, work)


@dataclass
class Detokenization:
    """One generated sequence's text, delta by delta (the postprocess stage's streaming Detokenize)."""

    decoder: IncrementalDetokenizer
    vocab: int

    def feed(self, ids: Sequence[int], finish: bool) -> TextDelta:
        """The text of `ids` that is safe to show; with `finish`, also what was held back (the sequence is over)."""
        if self.decoder.stopped:
            raise errors.invalid_argument("a stop string already ended this sequence; send no more ids", "token_ids")
        for token in ids:
            if not 0 <= token < self.vocab:
                raise errors.invalid_argument(
                    f"token id {token} is outside the vocabulary (0..{self.vocab - 1})", "token_ids"
                )
        delta = self.decoder.feed(ids)
        if finish and delta.stop is None:
            return TextDelta(delta.text + self.decoder.finish(), None)
        return delta
