"""Checks that the tiny test-model fixtures build correctly and that their reference outputs match the expected answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.reference import reference_classify, reference_embeddings, reference_ner, reference_rerank
from tests.fixtures.tiny_models import (
    PIECE_WORDS,
    build_tokenizer,
    classifier_examples,
    embedding_texts,
    make_embedding_model,
    multilabel_examples,
    ner_examples,
    rerank_examples,
)

TASKS = {
    "tiny-embed": "embedding",
    "tiny-embed-cls": "embedding",
    "tiny-sentiment": "classification",
    "tiny-topics": "classification",
    "tiny-ner": "token-classification",
    "tiny-rerank": "rerank",
}


@pytest.fixture(scope="module")
def repo(tiny_repository: Path) -> dict[str, Path]:
    """The session's repository (conftest builds it with build_all), by model name."""
    return {name: tiny_repository / name for name in TASKS}


def test_layout(repo: dict[str, Path], tiny_repository: Path) -> None:
    assert sorted(p.name for p in tiny_repository.iterdir()) == sorted(TASKS)
    for name, model_dir in repo.items():
        meta = json.loads((model_dir / "tandem.json").read_text())
        assert meta["task"] == TASKS[name] and meta["backend"] == "onnx"
        version = model_dir / "1"
        for f in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
        ):
            assert (version / f).is_file(), f"{name}: missing {f}"
        assert (version / "1_Pooling" / "config.json").is_file() == (TASKS[name] == "embedding")


def test_tokenizer_word_pieces(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(tmp_path)
    assert tokenizer.pad_token_id == 0 and tokenizer.model_max_length == 64
    for word, pieces in PIECE_WORDS.items():
        assert tokenizer.tokenize(word.capitalize()) == pieces
    assert (tmp_path / "vocab.txt").read_text().splitlines()[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_embeddings(repo: dict[str, Path], tmp_path: Path) -> None:
    texts = embedding_texts()
    mean = reference_embeddings(repo["tiny-embed"] / "1", texts)
    cls = reference_embeddings(repo["tiny-embed-cls"] / "1", texts)
    raw = reference_embeddings(repo["tiny-embed"] / "1", texts, normalize=False)
    assert mean.shape == (len(texts), 32) and mean.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(mean, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(mean, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    assert np.abs(mean - cls).max() > 0.1  # same weights (same seed), different pooling
    # Padding must not change a text's embedding: the shortest text alone vs. in a batch with longer texts.
    i = min(range(len(texts)), key=lambda k: len(texts[k]))
    np.testing.assert_allclose(reference_embeddings(repo["tiny-embed"] / "1", texts[i : i + 1])[0], mean[i], atol=1e-5)
    # Deterministic for a seed, different for another seed.
    again = make_embedding_model(tmp_path, seed=0)
    other = make_embedding_model(tmp_path, name="other", seed=1)
    assert (again / "1" / "model.safetensors").read_bytes() == (
        repo["tiny-embed"] / "1" / "model.safetensors"
    ).read_bytes()
    assert np.abs(reference_embeddings(other / "1", texts) - mean).max() > 0.1


def test_classifier(repo: dict[str, Path]) -> None:
    examples = classifier_examples()
    preds = reference_classify(repo["tiny-sentiment"] / "1", [t for t, _ in examples])
    assert {y for _, y in examples} == {"negative", "neutral", "positive"}
    for (text, expected), pred in zip(examples, preds, strict=True):
        assert pred[0][0] == expected, (text, pred)
        assert sorted(lab for lab, _ in pred) == ["negative", "neutral", "positive"]
        assert sum(s for _, s in pred) == pytest.approx(1.0, abs=1e-5)


def test_multilabel(repo: dict[str, Path]) -> None:
    examples = multilabel_examples()
    preds = reference_classify(repo["tiny-topics"] / "1", [t for t, _ in examples])
    assert any(len(y) >= 2 for _, y in examples) and any(not y for _, y in examples)
    for (text, expected), pred in zip(examples, preds, strict=True):
        assert sorted(lab for lab, s in pred if s >= 0.5) == sorted(expected), (text, pred)
        assert [s for _, s in pred] == sorted((s for _, s in pred), reverse=True)


def test_ner(repo: dict[str, Path]) -> None:
    examples = ner_examples()
    preds = reference_ner(repo["tiny-ner"] / "1", [t for t, _ in examples])
    entity_words = {w for text, ents in examples for e, _ in ents for w in e.lower().split()}
    assert entity_words & set(PIECE_WORDS) and any(" " in e for _, ents in examples for e, _ in ents)
    for (text, expected), pred in zip(examples, preds, strict=True):
        assert [(text[e["start"] : e["end"]], e["entity_group"]) for e in pred] == expected, (text, pred)
        assert [e["word"] for e in pred] == [e.lower() for e, _ in expected]


def test_rerank(repo: dict[str, Path]) -> None:
    for query, documents, relevant in rerank_examples():
        scores = reference_rerank(repo["tiny-rerank"] / "1", query, documents)
        assert len(scores) == len(documents) and all(0.0 <= s <= 1.0 for s in scores)
        assert max(range(len(scores)), key=scores.__getitem__) == relevant, (query, documents, scores)
