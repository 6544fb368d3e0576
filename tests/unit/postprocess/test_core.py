"""Unit tests of the postprocess core's numpy functions on hand-made arrays, including a differential test of entity
grouping against transformers' own TokenClassificationPipeline.group_entities."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import types
from typing import Any

import numpy as np
import pytest
import torch
from transformers.pipelines.token_classification import TokenClassificationPipeline

from services.common.pooling import pool_padded
from services.postprocess.core import (
    EmbeddingPostprocessor,
    Entity,
    RerankPostprocessor,
    SequenceClassificationPostprocessor,
    TokenClassificationPostprocessor,
    l2_normalize,
    sigmoid,
    softmax,
)

NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


def _ragged(lengths: list[int], dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    return rng.standard_normal((int(cu[-1]), dim)).astype(np.float32), cu


# ----------------------------------------------------------------------------------------------------------------------
# Pooling


def test_mean_pooling_is_the_mean_of_each_sequence_s_rows() -> None:
    rows, cu = _ragged([3, 1, 5], dim=4)
    pooled = EmbeddingPostprocessor("mean").pool(rows, cu)
    expected = np.stack([rows[0:3].mean(0), rows[3:4].mean(0), rows[4:9].mean(0)])
    assert pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)


def test_mean_pooling_equals_sentence_transformers_masked_mean_over_a_padded_batch() -> None:
    rows, cu = _ragged([2, 6, 4], dim=8, seed=1)
    lengths = np.diff(cu)
    padded = torch.zeros(3, int(lengths.max()), 8)
    mask = torch.zeros(3, int(lengths.max()))
    for i, (a, b) in enumerate(itertools.pairwise(cu)):
        padded[i, : b - a] = torch.from_numpy(rows[a:b])
        mask[i, : b - a] = 1
    # sentence-transformers' Pooling (mean): masked sum over a clamped token count.
    m = mask.unsqueeze(-1)
    expected = (padded * m).sum(1) / m.sum(1).clamp(min=1e-9)
    pooled = EmbeddingPostprocessor("mean").pool(rows, cu)
    np.testing.assert_allclose(pooled, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_cls_pooling_takes_each_sequence_s_first_row() -> None:
    rows, cu = _ragged([3, 2, 4], dim=4)
    pooled = EmbeddingPostprocessor("cls").pool(rows, cu)
    np.testing.assert_array_equal(pooled, rows[[0, 3, 5]])


def test_max_pooling_takes_the_column_maxima_of_each_sequence() -> None:
    rows, cu = _ragged([3, 1, 2], dim=5)
    pooled = EmbeddingPostprocessor("max").pool(rows, cu)
    np.testing.assert_array_equal(pooled, np.stack([rows[0:3].max(0), rows[3], rows[4:6].max(0)]))


def test_normalize_matches_torch_and_keeps_zero_rows_zero() -> None:
    rows = np.array([[3.0, 4.0], [0.0, 0.0], [1e-20, 0.0]], dtype=np.float32)
    expected = torch.nn.functional.normalize(torch.from_numpy(rows), p=2, dim=1).numpy()
    np.testing.assert_allclose(l2_normalize(rows), expected, rtol=1e-6)
    assert l2_normalize(rows)[1].tolist() == [0.0, 0.0]


def test_pool_with_normalize_gives_unit_rows() -> None:
    rows, cu = _ragged([4, 7], dim=16)
    pooled = EmbeddingPostprocessor("mean").pool(rows, cu, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), [1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_pooling_a_padded_batch_in_the_inference_stage_equals_pooling_its_ragged_rows(pooling: str) -> None:
    """The inference stage pools a call's padded output (InferRequest.pool); the postprocess stage pools ragged
    rows. Both must give the same vectors whatever the padding holds (here: huge values, which a mean or max that
    let padding in would show)."""
    rows, cu = _ragged([2, 7, 1, 5], dim=6, seed=3)
    lengths = np.diff(cu)
    padded = np.full((4, 9, 6), 1e6, dtype=np.float32)
    for i, (a, b) in enumerate(itertools.pairwise(cu)):
        padded[i, : b - a] = rows[a:b]
    mask = (np.arange(9)[None, :] < lengths[:, None]).astype(np.int64)
    got = pool_padded(padded, mask, pooling)
    assert got.dtype == np.float32 and got.shape == (4, 6)
    np.testing.assert_allclose(got, EmbeddingPostprocessor(pooling).pool(rows, cu), rtol=1e-6, atol=1e-7)


def test_unknown_pooling_is_refused() -> None:
    with pytest.raises(ValueError, match="pooling"):
        EmbeddingPostprocessor("mean_sqrt_len")


# ----------------------------------------------------------------------------------------------------------------------
# Activations


def test_softmax_and_sigmoid_are_stable_for_extreme_logits() -> None:
    logits = np.array([[1000.0, -1000.0, 0.0], [-1e4, -1e4, -1e4]], dtype=np.float32)
    # Underflow to 0 is the right answer for a hopeless label; overflow or NaN would not be.
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        probs = softmax(logits)
        sig = sigmoid(logits)
    np.testing.assert_allclose(probs.sum(1), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(probs[1], [1 / 3] * 3, rtol=1e-6)
    assert sig[0].tolist() == [1.0, 0.0, 0.5]
    np.testing.assert_allclose(sig, torch.sigmoid(torch.from_numpy(logits)).numpy(), atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------------
# Sequence classification


def test_classification_ranks_labels_best_first_with_their_index() -> None:
    post = SequenceClassificationPostprocessor(("negative", "neutral", "positive"))
    logits = np.array([[0.0, 1.0, 3.0], [2.0, 0.0, 0.0]], dtype=np.float32)
    results = post.classify(logits)
    p = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    assert [s.label for s in results[0]] == ["positive", "neutral", "negative"]
    assert [s.index for s in results[0]] == [2, 1, 0]
    np.testing.assert_allclose([s.score for s in results[0]], p[0][[2, 1, 0]], rtol=1e-6)
    # Equal probabilities keep label order, like sorted() in the pipeline.
    assert [s.label for s in results[1]] == ["negative", "neutral", "positive"]


def test_classification_top_k_keeps_the_best() -> None:
    post = SequenceClassificationPostprocessor(("a", "b", "c", "d"))
    results = post.classify(np.array([[0.1, 0.4, 0.3, 0.2]], dtype=np.float32), top_k=2)
    assert [(s.label, s.index) for s in results[0]] == [("b", 1), ("c", 2)]
    everything = post.classify(np.array([[0.1, 0.4, 0.3, 0.2]], dtype=np.float32), top_k=10)
    assert len(everything[0]) == 4


def test_multi_label_classification_uses_an_independent_sigmoid_per_label() -> None:
    post = SequenceClassificationPostprocessor(("sports", "food", "travel"), multi_label=True)
    logits = np.array([[2.0, 2.0, -3.0]], dtype=np.float32)
    results = post.classify(logits)
    expected = 1 / (1 + np.exp(-logits[0]))
    assert [s.label for s in results[0]] == ["sports", "food", "travel"]
    np.testing.assert_allclose([s.score for s in results[0]], expected, rtol=1e-6)
    assert sum(s.score for s in results[0]) > 1.5  # not a distribution: two labels are on at once
    # Field by field: pytest.approx stands in for the score, which a LabelScore cannot hold.
    assert dataclasses.astuple(results[0][0]) == ("sports", pytest.approx(expected[0]), 0)


# ----------------------------------------------------------------------------------------------------------------------
# Token classification


def _one_hot_logits(tags: list[str], labels: tuple[str, ...] = NER_LABELS, confidence: float = 4.0) -> np.ndarray:
    logits = np.zeros((len(tags), len(labels)), dtype=np.float32)
    for row, tag in enumerate(tags):
        logits[row, labels.index(tag)] = confidence
    return logits


def _entities(
    tags: list[str],
    text: str,
    spans: list[tuple[int, int]],
    special: list[int] | None = None,
    labels: tuple[str, ...] = NER_LABELS,
) -> list[Entity]:
    cu = np.array([0, len(tags)], dtype=np.int32)
    offsets = np.array(spans, dtype=np.int32).reshape(-1, 2)
    mask = np.array(special or [0] * len(tags), dtype=np.uint8)
    post = TokenClassificationPostprocessor(labels)
    return post.entities(_one_hot_logits(tags, labels), cu, offsets, mask, [text])[0]


def _word_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for word in text.split(" "):
        spans.append((start, start + len(word)))
        start += len(word) + 1
    return spans


TEXT = "anna smith met john in new york"
WORDS = _word_spans(TEXT)


def test_b_then_i_is_one_entity_spanning_from_first_start_to_last_end() -> None:
    got = _entities(["B-PER", "I-PER", "O", "B-PER", "O", "B-LOC", "I-LOC"], TEXT, WORDS)
    assert [(e.label, e.start, e.end, e.text) for e in got] == [
        ("PER", 0, 10, "anna smith"),
        ("PER", 15, 19, "john"),
        ("LOC", 23, 31, "new york"),
    ]


def test_a_b_label_always_starts_a_new_entity() -> None:
    got = _entities(["B-PER", "B-PER", "O", "O", "O", "B-LOC", "B-LOC"], TEXT, WORDS)
    assert [e.text for e in got] == ["anna", "smith", "new", "york"]


def test_i_without_b_starts_an_entity_and_o_breaks_one() -> None:
    got = _entities(["I-PER", "I-PER", "O", "I-PER", "O", "O", "I-LOC"], TEXT, WORDS)
    assert [(e.label, e.text) for e in got] == [("PER", "anna smith"), ("PER", "john"), ("LOC", "york")]


def test_a_change_of_type_splits_entities_even_without_b() -> None:
    got = _entities(["B-PER", "I-LOC", "O", "O", "O", "I-LOC", "I-PER"], TEXT, WORDS)
    assert [(e.label, e.text) for e in got] == [("PER", "anna"), ("LOC", "smith"), ("LOC", "new"), ("PER", "york")]


def test_word_pieces_join_into_one_entity() -> None:
    # "amsterdam" as am ##ster ##dam: the model tags the continuation pieces I-LOC.
    got = _entities(["O", "B-LOC", "I-LOC", "I-LOC"], "to amsterdam", [(0, 2), (3, 5), (5, 9), (9, 12)])
    assert [(e.label, e.start, e.end, e.text) for e in got] == [("LOC", 3, 12, "amsterdam")]


def test_special_tokens_are_skipped_before_grouping() -> None:
    tags = ["B-PER", "B-PER", "I-PER", "B-LOC", "I-PER"]
    spans = [(0, 0), (0, 4), (5, 10), (0, 0), (11, 14)]
    got = _entities(tags, "anna smith met", spans, special=[1, 0, 0, 1, 0])
    # [CLS] and the [SEP] in the middle are dropped as in the pipeline, so "met" joins the entity before it.
    assert [(e.label, e.text) for e in got] == [("PER", "anna smith met")]


def test_entity_score_is_the_mean_of_its_tokens_probabilities() -> None:
    logits = np.array([[0.0, 3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    got = TokenClassificationPostprocessor(NER_LABELS).entities(
        logits,
        np.array([0, 3], np.int32),
        np.array([[0, 4], [5, 10], [11, 14]], np.int32),
        np.zeros(3, np.uint8),
        [TEXT],
    )[0]
    assert len(got) == 1
    assert got[0].score == pytest.approx((probs[0, 1] + probs[1, 2]) / 2, abs=1e-6)


def test_entities_never_cross_sequences() -> None:
    logits = _one_hot_logits(["B-PER", "I-PER", "I-PER", "I-PER"])
    cu = np.array([0, 2, 2, 4], dtype=np.int32)  # the middle sequence is empty
    offsets = np.array([[0, 4], [5, 10], [0, 4], [5, 9]], dtype=np.int32)
    got = TokenClassificationPostprocessor(NER_LABELS).entities(
        logits, cu, offsets, np.zeros(4, np.uint8), ["anna smith", "", "john doe"]
    )
    assert [[e.text for e in seq] for seq in got] == [["anna smith"], [], ["john doe"]]


def test_all_special_tokens_or_all_o_give_no_entities() -> None:
    assert _entities(["B-PER", "I-PER"], "ab", [(0, 0), (0, 0)], special=[1, 1]) == []
    assert _entities(["O", "O", "O"], TEXT, WORDS[:3]) == []


def test_labels_without_prefixes_group_by_equality() -> None:
    labels = ("O", "PER", "LOC")
    text = "anna smith met york john"
    got = _entities(["PER", "PER", "O", "LOC", "PER"], text, _word_spans(text), labels=labels)
    assert [(e.label, e.text) for e in got] == [("PER", "anna smith"), ("LOC", "york"), ("PER", "john")]


def _pipeline_groups(labels: tuple[str, ...], probs: np.ndarray, spans: np.ndarray, special: np.ndarray) -> list[Any]:
    """transformers' own aggregation ("simple") of one sequence, run on a stand-in for the pipeline object."""
    fake: Any = types.SimpleNamespace(tokenizer=types.SimpleNamespace(convert_tokens_to_string=" ".join))
    fake.get_tag = functools.partial(TokenClassificationPipeline.get_tag, fake)
    fake.group_sub_entities = functools.partial(TokenClassificationPipeline.group_sub_entities, fake)
    tokens = []
    for idx, scores in enumerate(probs):
        if special[idx]:
            continue
        best = int(scores.argmax())
        tokens.append(
            {"entity": labels[best], "score": scores[best], "index": idx, "word": f"t{idx}",
             "start": int(spans[idx, 0]), "end": int(spans[idx, 1])}
        )  # fmt: skip
    groups = TokenClassificationPipeline.group_entities(fake, tokens) if tokens else []
    return [(g["entity_group"], float(g["score"]), g["start"], g["end"]) for g in groups if g["entity_group"] != "O"]


@pytest.mark.parametrize(
    "labels",
    [NER_LABELS, ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "MISC", "E-PER", "S-LOC")],
)
def test_grouping_matches_the_transformers_pipeline_on_random_sequences(labels: tuple[str, ...]) -> None:
    rng = np.random.default_rng(7)
    post = TokenClassificationPostprocessor(labels)
    for _ in range(200):
        n = int(rng.integers(1, 14))
        logits = (rng.standard_normal((n, len(labels))) * 3).astype(np.float32)
        special = (rng.random(n) < 0.15).astype(np.uint8)
        starts = np.cumsum(rng.integers(0, 3, n) + 1) + np.arange(n) * 3
        spans = np.stack([starts, starts + 2], axis=1).astype(np.int32)
        text = "x" * int(spans[-1, 1])
        got = post.entities(logits, np.array([0, n], np.int32), spans, special, [text])[0]
        expected = _pipeline_groups(labels, softmax(logits), spans, special)
        assert [(e.label, e.start, e.end) for e in got] == [(g[0], g[2], g[3]) for g in expected]
        np.testing.assert_allclose([e.score for e in got], [g[1] for g in expected], atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Rerank


def test_rerank_single_logit_is_a_sigmoid_best_first() -> None:
    logits = np.array([[-1.0], [2.0], [0.5]], dtype=np.float32)
    ranked = RerankPostprocessor().rank(logits)
    expected = torch.sigmoid(torch.from_numpy(logits[:, 0])).numpy()
    assert [d.index for d in ranked] == [1, 2, 0]
    np.testing.assert_allclose([d.score for d in ranked], expected[[1, 2, 0]], rtol=1e-6)


def test_rerank_two_logits_is_the_softmax_probability_of_class_one() -> None:
    logits = np.array([[2.0, -1.0], [0.0, 3.0]], dtype=np.float32)
    ranked = RerankPostprocessor().rank(logits)
    expected = torch.softmax(torch.from_numpy(logits), dim=-1)[:, 1].numpy()
    assert [d.index for d in ranked] == [1, 0]
    np.testing.assert_allclose([d.score for d in ranked], expected[[1, 0]], rtol=1e-6)


def test_rerank_top_n_and_ties_keep_request_order() -> None:
    logits = np.array([[0.0], [1.0], [0.0], [1.0]], dtype=np.float32)
    assert [dataclasses.astuple(d) for d in RerankPostprocessor().rank(logits, top_n=3)] == [
        (1, pytest.approx(0.7310586)),
        (3, pytest.approx(0.7310586)),
        (0, 0.5),
    ]
