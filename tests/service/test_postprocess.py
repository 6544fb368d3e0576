"""The postprocess service over a real gRPC channel, fed with outputs of the tiny models run in-process and checked
against sentence-transformers-style pooling and the transformers pipelines (tests/fixtures/reference.py)."""

from __future__ import annotations

import functools
import itertools
import json
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from services.common import errors, tensors
from services.common.errors import Reason
from services.common.repository import ModelRepository
from services.common.server import start_server
from services.postprocess.core import Postprocessor
from services.postprocess.servicer import registrar
from tandem.postprocess.v1 import postprocess_pb2, postprocess_pb2_grpc
from tandem.tensor.v1 import tensor_pb2
from tests.fixtures.reference import reference_classify, reference_embeddings, reference_ner, reference_rerank
from tests.fixtures.tiny_models import (
    NER_LABELS,
    SENTIMENT_LABELS,
    TOPIC_LABELS,
    classifier_examples,
    embedding_texts,
    multilabel_examples,
    ner_examples,
    rerank_examples,
)

if TYPE_CHECKING:
    Stub = postprocess_pb2_grpc.PostprocessServiceAsyncStub


@pytest.fixture(scope="module")
async def stub(tiny_repository: Path) -> AsyncIterator[Stub]:
    running = await start_server("127.0.0.1:0", [registrar(Postprocessor(ModelRepository(tiny_repository)))])
    async with grpc.aio.insecure_channel(running.address) as channel:
        yield postprocess_pb2_grpc.PostprocessServiceStub(channel)
    await running.stop(0)


# ----------------------------------------------------------------------------------------------------------------------
# Model outputs computed in-process, flattened to ragged rows as the inference stage sends them


def _vdir(repository: Path, name: str) -> Path:
    return repository / name / "1"


@functools.cache
def _tokenizer(path: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(path))


@functools.cache
def _model(path: Path, kind: type[Any]) -> Any:
    return kind.from_pretrained(str(path)).eval()


def _cu(lengths: Sequence[int]) -> np.ndarray:
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    return cu


@torch.no_grad()
def token_embeddings(path: Path, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Last hidden states of the real tokens only, [total_tokens, hidden], and their cu_seqlens."""
    enc = _tokenizer(path)(list(texts), padding=True, truncation=True, return_tensors="pt")
    hidden = _model(path, AutoModel)(**enc).last_hidden_state
    mask = enc["attention_mask"].bool()
    return hidden[mask].numpy().astype(np.float32), _cu(mask.sum(1).tolist())


@torch.no_grad()
def sequence_logits(path: Path, texts: Sequence[str], pairs: Sequence[str] | None = None) -> np.ndarray:
    enc = _tokenizer(path)(
        list(texts), list(pairs) if pairs else None, padding=True, truncation=True, return_tensors="pt"
    )
    logits: np.ndarray = _model(path, AutoModelForSequenceClassification)(**enc).logits.numpy()
    return logits


@torch.no_grad()
def token_logits(path: Path, texts: Sequence[str]) -> tuple[np.ndarray, tensor_pb2.TokenBatch]:
    """Per-token logits and the token batch (cu_seqlens, offsets, special mask), each text run on its own as the
    pipeline does."""
    tokenizer, model = _tokenizer(path), _model(path, AutoModelForTokenClassification)
    logits, offsets, special, lengths = [], [], [], []
    for text in texts:
        enc = tokenizer(
            text, truncation=True, return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt"
        )
        offsets.append(enc.pop("offset_mapping")[0].numpy())
        special.append(enc.pop("special_tokens_mask")[0].numpy())
        logits.append(model(**enc).logits[0].numpy())
        lengths.append(len(special[-1]))
    batch = tensor_pb2.TokenBatch(
        cu_seqlens=tensors.encode(_cu(lengths)),
        offsets=tensors.encode(np.concatenate(offsets).astype(np.int32)),
        special_tokens_mask=tensors.encode(np.concatenate(special).astype(np.uint8)),
    )
    return np.concatenate(logits).astype(np.float32), batch


def pool_request(model: str, rows: np.ndarray, cu: np.ndarray, normalize: bool = True) -> postprocess_pb2.PoolRequest:
    return postprocess_pb2.PoolRequest(
        model=model,
        version="1",
        token_embeddings=tensors.encode(rows),
        cu_seqlens=tensors.encode(cu),
        normalize=normalize,
    )


def embeddings_of(response: postprocess_pb2.PoolResponse) -> np.ndarray:
    return np.asarray(tensors.decode(response.embeddings, "embeddings"))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    result: np.ndarray = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Pool


@pytest.mark.parametrize("name", ["tiny-embed", "tiny-embed-cls"])
@pytest.mark.parametrize("normalize", [True, False])
async def test_pool_matches_the_reference_embeddings(
    stub: Stub, tiny_repository: Path, name: str, normalize: bool
) -> None:
    path, texts = _vdir(tiny_repository, name), embedding_texts(n=8)
    rows, cu = token_embeddings(path, texts)
    response = await stub.Pool(pool_request(name, rows, cu, normalize))
    got = embeddings_of(response)
    expected = reference_embeddings(path, texts, normalize=normalize)
    assert response.embeddings.dtype == tensor_pb2.DATA_TYPE_FLOAT32
    assert got.shape == expected.shape == (8, 32)
    assert cosines(got, expected).min() >= 0.9999
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
async def test_rows_the_inference_stage_pooled_are_only_checked_and_normalized(
    stub: Stub, tiny_repository: Path, normalize: bool
) -> None:
    """PoolRequest.pooled_embeddings (InferResponse.pooled): the same answer as pooling the token rows here."""
    path, texts = _vdir(tiny_repository, "tiny-embed"), embedding_texts(n=8)
    rows, cu = token_embeddings(path, texts)
    pooled_rows = reference_embeddings(path, texts, normalize=False)
    request = postprocess_pb2.PoolRequest(
        model="tiny-embed",
        version="1",
        pooled_embeddings=tensors.encode(pooled_rows),
        cu_seqlens=tensors.encode(cu),
        normalize=normalize,
    )
    got = embeddings_of(await stub.Pool(request))
    from_tokens = embeddings_of(await stub.Pool(pool_request("tiny-embed", rows, cu, normalize)))
    np.testing.assert_allclose(got, from_tokens, rtol=1e-4, atol=1e-5)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    else:
        np.testing.assert_array_equal(got, pooled_rows)


async def test_the_model_s_pooling_decides_the_result(stub: Stub, tiny_repository: Path) -> None:
    # The same token rows, pooled by a mean-pooling and a cls-pooling model of the same width.
    texts = embedding_texts(n=4)
    rows, cu = token_embeddings(_vdir(tiny_repository, "tiny-embed-cls"), texts)
    mean = embeddings_of(await stub.Pool(pool_request("tiny-embed", rows, cu, normalize=False)))
    cls = embeddings_of(await stub.Pool(pool_request("tiny-embed-cls", rows, cu, normalize=False)))
    np.testing.assert_array_equal(cls, rows[cu[:-1]])
    np.testing.assert_allclose(mean, np.stack([rows[a:b].mean(0) for a, b in itertools.pairwise(cu)]), atol=1e-6)
    assert cosines(mean, cls).max() < 0.99
    # And only the model's own pooling reproduces its reference.
    reference = reference_embeddings(_vdir(tiny_repository, "tiny-embed-cls"), texts, normalize=False)
    assert cosines(cls, reference).min() >= 0.9999
    assert cosines(mean, reference).max() < 0.99


async def test_pool_accepts_float16_rows(stub: Stub, tiny_repository: Path) -> None:
    path, texts = _vdir(tiny_repository, "tiny-embed"), embedding_texts(n=3)
    rows, cu = token_embeddings(path, texts)
    got = embeddings_of(await stub.Pool(pool_request("tiny-embed", rows.astype(np.float16), cu)))
    assert got.dtype == np.float32
    assert cosines(got, reference_embeddings(path, texts)).min() >= 0.999


async def test_a_large_batch_is_pooled_off_the_event_loop_with_the_same_result(stub: Stub) -> None:
    # Over 2,400 rows x 32 exceeds the core's inline limit, so this goes through asyncio.to_thread.
    rng = np.random.default_rng(3)
    lengths = rng.integers(20, 40, 120)
    cu = _cu(lengths.tolist())
    rows = rng.standard_normal((int(cu[-1]), 32)).astype(np.float32)
    got = embeddings_of(await stub.Pool(pool_request("tiny-embed", rows, cu, normalize=False)))
    np.testing.assert_allclose(got, np.stack([rows[a:b].mean(0) for a, b in itertools.pairwise(cu)]), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Classify


async def test_classify_matches_the_reference_labels_and_scores(stub: Stub, tiny_repository: Path) -> None:
    path = _vdir(tiny_repository, "tiny-sentiment")
    texts = [t for t, _ in classifier_examples(n=24)]
    request = postprocess_pb2.ClassifyRequest(
        model="tiny-sentiment", version="1", logits=tensors.encode(sequence_logits(path, texts))
    )
    response = await stub.Classify(request)
    expected = reference_classify(path, texts)
    assert len(response.results) == len(texts)
    for result, reference in zip(response.results, expected, strict=True):
        assert [s.label for s in result.labels] == [label for label, _ in reference]
        np.testing.assert_allclose([s.score for s in result.labels], [score for _, score in reference], atol=1e-5)
        assert [s.index for s in result.labels] == [SENTIMENT_LABELS.index(s.label) for s in result.labels]


async def test_classify_top_k_keeps_the_best_labels(stub: Stub, tiny_repository: Path) -> None:
    path = _vdir(tiny_repository, "tiny-sentiment")
    texts = [t for t, _ in classifier_examples(n=5)]
    logits = tensors.encode(sequence_logits(path, texts))
    top1 = await stub.Classify(postprocess_pb2.ClassifyRequest(model="tiny-sentiment", logits=logits, top_k=1))
    expected = reference_classify(path, texts)
    assert [[s.label for s in r.labels] for r in top1.results] == [[ref[0][0]] for ref in expected]


async def test_multi_label_classify_uses_sigmoids(stub: Stub, tiny_repository: Path) -> None:
    path = _vdir(tiny_repository, "tiny-topics")
    examples = multilabel_examples(n=24)
    texts = [t for t, _ in examples]
    request = postprocess_pb2.ClassifyRequest(
        model="tiny-topics", version="1", logits=tensors.encode(sequence_logits(path, texts))
    )
    response = await stub.Classify(request)
    expected = reference_classify(path, texts)
    for result, reference in zip(response.results, expected, strict=True):
        assert [s.label for s in result.labels] == [label for label, _ in reference]
        np.testing.assert_allclose([s.score for s in result.labels], [score for _, score in reference], atol=1e-5)
    # Independent probabilities, not a distribution over the labels.
    assert any(abs(sum(s.score for s in r.labels) - 1.0) > 0.1 for r in response.results)
    assert {s.label for s in response.results[0].labels} == set(TOPIC_LABELS)


async def test_labels_come_from_the_model_s_id2label(stub: Stub, tiny_repository: Path, tmp_path: Path) -> None:
    # A copy of tiny-sentiment whose config names its outputs differently: the same logits, the new names.
    shutil.copytree(tiny_repository / "tiny-sentiment", tmp_path / "renamed")
    config_file = tmp_path / "renamed" / "1" / "config.json"
    config = json.loads(config_file.read_text())
    config["id2label"] = {"0": "bad", "1": "meh", "2": "good"}
    config_file.write_text(json.dumps(config))
    logits = tensors.encode(np.array([[0.0, 1.0, 4.0], [3.0, 0.0, 0.0]], dtype=np.float32))
    running = await start_server("127.0.0.1:0", [registrar(Postprocessor(ModelRepository(tmp_path)))])
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            renamed = await postprocess_pb2_grpc.PostprocessServiceStub(channel).Classify(
                postprocess_pb2.ClassifyRequest(model="renamed", version="1", logits=logits)
            )
    finally:
        await running.stop(0)
    original = await stub.Classify(postprocess_pb2.ClassifyRequest(model="tiny-sentiment", version="1", logits=logits))
    assert [[(s.label, s.index) for s in r.labels] for r in renamed.results] == [
        [("good", 2), ("meh", 1), ("bad", 0)],
        [("bad", 0), ("meh", 1), ("good", 2)],
    ]
    assert [s.label for s in original.results[0].labels] == ["positive", "neutral", "negative"]
    assert [s.score for s in renamed.results[0].labels] == [s.score for s in original.results[0].labels]


# ----------------------------------------------------------------------------------------------------------------------
# ClassifyTokens


async def test_classify_tokens_matches_the_pipeline_entities(stub: Stub, tiny_repository: Path) -> None:
    path = _vdir(tiny_repository, "tiny-ner")
    texts = [t for t, _ in ner_examples(n=40)]
    logits, batch = token_logits(path, texts)
    request = postprocess_pb2.ClassifyTokensRequest(
        model="tiny-ner", version="1", logits=tensors.encode(logits), batch=batch, texts=texts
    )
    response = await stub.ClassifyTokens(request)
    expected = reference_ner(path, texts)
    assert len(response.results) == len(texts)
    multi_token = 0
    for text, result, reference in zip(texts, response.results, expected, strict=True):
        got = [(e.label, e.start, e.end, e.text) for e in result.entities]
        assert got == [(r["entity_group"], r["start"], r["end"], text[r["start"] : r["end"]]) for r in reference]
        np.testing.assert_allclose([e.score for e in result.entities], [r["score"] for r in reference], atol=1e-4)
        multi_token += sum(" " in e.text for e in result.entities)
    assert multi_token > 0  # some entities were grouped from several words, so grouping was exercised
    assert {e.label for r in response.results for e in r.entities} == {
        label[2:] for label in NER_LABELS if label != "O"
    }


async def test_entity_text_uses_code_point_offsets(stub: Stub, tiny_repository: Path) -> None:
    path = _vdir(tiny_repository, "tiny-ner")
    texts = ["ÄÖ \u2013 we met Anna Smith in Paris", "😀 Peter went to London"]
    logits, batch = token_logits(path, texts)
    response = await stub.ClassifyTokens(
        postprocess_pb2.ClassifyTokensRequest(model="tiny-ner", logits=tensors.encode(logits), batch=batch, texts=texts)
    )
    expected = reference_ner(path, texts)
    for text, result, reference in zip(texts, response.results, expected, strict=True):
        assert [(e.start, e.end, e.text) for e in result.entities] == [
            (r["start"], r["end"], text[r["start"] : r["end"]]) for r in reference
        ]


# ----------------------------------------------------------------------------------------------------------------------
# Rerank


async def test_rerank_matches_the_reference_order_and_scores(stub: Stub, tiny_repository: Path) -> None:
    path = _vdir(tiny_repository, "tiny-rerank")
    for query, documents, _ in rerank_examples(n=10):
        logits = sequence_logits(path, [query] * len(documents), documents)
        response = await stub.Rerank(
            postprocess_pb2.RerankRequest(model="tiny-rerank", version="1", logits=tensors.encode(logits))
        )
        reference = reference_rerank(path, query, documents)
        assert [d.index for d in response.results] == sorted(range(len(documents)), key=lambda i: -reference[i])
        np.testing.assert_allclose([d.score for d in response.results], sorted(reference, reverse=True), atol=1e-5)


async def test_rerank_top_n(stub: Stub, tiny_repository: Path) -> None:
    path = _vdir(tiny_repository, "tiny-rerank")
    query, documents, _ = rerank_examples(n=1, n_docs=5)[0]
    logits = tensors.encode(sequence_logits(path, [query] * len(documents), documents))
    full = await stub.Rerank(postprocess_pb2.RerankRequest(model="tiny-rerank", logits=logits))
    top2 = await stub.Rerank(postprocess_pb2.RerankRequest(model="tiny-rerank", logits=logits, top_n=2))
    assert len(full.results) == 5
    assert list(top2.results) == list(full.results[:2])


# ----------------------------------------------------------------------------------------------------------------------
# Errors: code, message, ErrorInfo reason and the BadRequest field


def _details(err: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status in the trailers"
    info, fields = error_details_pb2.ErrorInfo(), list[str]()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    assert info.domain == errors.DOMAIN
    return info, fields


async def _fails(call: Any, code: grpc.StatusCode, reason: str, field: str | None, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    err = caught.value
    assert err.code() == code, err.details()
    assert message in (err.details() or "")
    info, fields = _details(err)
    assert info.reason == reason
    assert fields == ([field] if field else [])


def _floats(*shape: int, fill: float = 0.1) -> tensor_pb2.Tensor:
    return tensors.encode(np.full(shape, fill, dtype=np.float32))


def _ints(values: Sequence[int]) -> tensor_pb2.Tensor:
    return tensors.encode(np.array(values, dtype=np.int32))


def _pool(model: str = "tiny-embed", rows: int = 5, dim: int = 32, cu: Sequence[int] = (0, 2, 5), **kw: Any) -> Any:
    return postprocess_pb2.PoolRequest(model=model, token_embeddings=_floats(rows, dim), cu_seqlens=_ints(cu), **kw)


def _ner_batch(cu: Sequence[int] = (0, 3), offsets: Sequence[Sequence[int]] = ((0, 0), (0, 4), (0, 0))) -> Any:
    return tensor_pb2.TokenBatch(
        cu_seqlens=_ints(cu),
        offsets=tensors.encode(np.array(offsets, dtype=np.int32).reshape(-1, 2)),
        special_tokens_mask=tensors.encode(np.array([1] + [0] * (len(offsets) - 2) + [1], dtype=np.uint8)),
    )


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


async def test_a_model_of_another_task_is_refused(stub: Stub) -> None:
    await _fails(stub.Pool(_pool(model="tiny-sentiment")), INVALID, Reason.WRONG_TASK, "model", "not embedding")
    await _fails(
        stub.Classify(postprocess_pb2.ClassifyRequest(model="tiny-embed", logits=_floats(1, 3))),
        INVALID, Reason.WRONG_TASK, "model", "is for embedding, not classification",
    )  # fmt: skip
    await _fails(
        stub.Rerank(postprocess_pb2.RerankRequest(model="tiny-sentiment", logits=_floats(2, 1))),
        INVALID, Reason.WRONG_TASK, "model", "not rerank",
    )  # fmt: skip
    await _fails(
        stub.ClassifyTokens(
            postprocess_pb2.ClassifyTokensRequest(model="tiny-topics", logits=_floats(3, 3), batch=_ner_batch(), texts=["anna"])
        ),
        INVALID, Reason.WRONG_TASK, "model", "not token-classification",
    )  # fmt: skip


async def test_unknown_models_and_versions_are_not_found(stub: Stub) -> None:
    await _fails(stub.Pool(_pool(model="no-such-model")), NOT_FOUND, Reason.MODEL_NOT_FOUND, None, "not found")
    await _fails(stub.Pool(_pool(version="7")), NOT_FOUND, Reason.MODEL_NOT_FOUND, None, "has no version 7")
    await _fails(stub.Pool(_pool(version="latest")), INVALID, Reason.INVALID_INPUT, "version", "must be a number")


async def test_pool_shapes_must_agree_with_cu_seqlens_and_the_model(stub: Stub) -> None:
    await _fails(stub.Pool(_pool(rows=6)), INVALID, Reason.INVALID_INPUT, "token_embeddings", "6 rows")
    await _fails(stub.Pool(_pool(cu=(1, 2, 5))), INVALID, Reason.INVALID_INPUT, "cu_seqlens", "start at 0")
    await _fails(stub.Pool(_pool(cu=(0, 4, 2))), INVALID, Reason.INVALID_INPUT, "cu_seqlens", "never decrease")
    await _fails(stub.Pool(_pool(cu=(0,))), INVALID, Reason.INVALID_INPUT, "cu_seqlens", "one sequence")
    await _fails(stub.Pool(_pool(cu=(0, 0, 5))), INVALID, Reason.INVALID_INPUT, "cu_seqlens", "empty sequence")
    await _fails(stub.Pool(_pool(dim=16)), INVALID, Reason.INVALID_INPUT, "token_embeddings", "hidden size 32")
    missing = postprocess_pb2.PoolRequest(model="tiny-embed", cu_seqlens=_ints((0, 1)))
    await _fails(stub.Pool(missing), INVALID, Reason.INVALID_INPUT, "token_embeddings", "is required")


async def test_pooled_rows_must_agree_with_cu_seqlens_and_the_model(stub: Stub) -> None:
    def pooled(rows: int = 2, dim: int = 32, cu: Sequence[int] = (0, 2, 5), **kw: Any) -> Any:
        return postprocess_pb2.PoolRequest(
            model=kw.pop("model", "tiny-embed"), pooled_embeddings=_floats(rows, dim), cu_seqlens=_ints(cu), **kw
        )

    await _fails(stub.Pool(pooled(rows=3)), INVALID, Reason.INVALID_INPUT, "pooled_embeddings", "3 rows")
    await _fails(stub.Pool(pooled(dim=16)), INVALID, Reason.INVALID_INPUT, "pooled_embeddings", "hidden size 32")
    await _fails(stub.Pool(pooled(cu=(1, 2, 5))), INVALID, Reason.INVALID_INPUT, "cu_seqlens", "start at 0")
    await _fails(stub.Pool(pooled(model="tiny-sentiment")), INVALID, Reason.WRONG_TASK, "model", "not embedding")
    both = pooled(token_embeddings=_floats(5, 32))
    await _fails(stub.Pool(both), INVALID, Reason.INVALID_INPUT, "pooled_embeddings", "not both")
    rows = np.zeros((2, 32), dtype=np.float32)
    rows[1, 3] = float("nan")
    nan = postprocess_pb2.PoolRequest(
        model="tiny-embed", pooled_embeddings=tensors.encode(rows), cu_seqlens=_ints((0, 2, 5))
    )
    await _fails(stub.Pool(nan), INVALID, Reason.INVALID_INPUT, "pooled_embeddings", "NaN or infinite")
    no_cu = postprocess_pb2.PoolRequest(model="tiny-embed", pooled_embeddings=_floats(2, 32))
    await _fails(stub.Pool(no_cu), INVALID, Reason.INVALID_INPUT, "cu_seqlens", "is required")


async def test_malformed_tensors_are_refused_by_the_codec(stub: Stub) -> None:
    ints = tensors.encode(np.zeros((5, 32), dtype=np.int64))
    request = postprocess_pb2.PoolRequest(model="tiny-embed", token_embeddings=ints, cu_seqlens=_ints((0, 5)))
    await _fails(stub.Pool(request), INVALID, Reason.INVALID_INPUT, "token_embeddings.dtype", "expected float32")
    short = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[5, 32], data=b"\0" * 12)
    request = postprocess_pb2.PoolRequest(model="tiny-embed", token_embeddings=short, cu_seqlens=_ints((0, 5)))
    await _fails(stub.Pool(request), INVALID, Reason.INVALID_INPUT, "token_embeddings.data", "do not hold")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
async def test_non_finite_values_are_refused(stub: Stub, bad: float) -> None:
    rows = np.zeros((3, 32), dtype=np.float32)
    rows[1, 7] = bad
    pool = postprocess_pb2.PoolRequest(
        model="tiny-embed", token_embeddings=tensors.encode(rows), cu_seqlens=_ints((0, 3))
    )
    await _fails(stub.Pool(pool), INVALID, Reason.INVALID_INPUT, "token_embeddings", "NaN or infinite")
    logits = tensors.encode(np.array([[0.0, bad, 1.0]], dtype=np.float32))
    classify = postprocess_pb2.ClassifyRequest(model="tiny-sentiment", logits=logits)
    await _fails(stub.Classify(classify), INVALID, Reason.INVALID_INPUT, "logits", "NaN or infinite")
    rerank = postprocess_pb2.RerankRequest(model="tiny-rerank", logits=tensors.encode(np.array([[bad]], np.float32)))
    await _fails(stub.Rerank(rerank), INVALID, Reason.INVALID_INPUT, "logits", "NaN or infinite")
    tokens = np.zeros((3, 5), dtype=np.float32)
    tokens[0, 0] = bad  # even on a special token: the inference stage produced garbage
    request = postprocess_pb2.ClassifyTokensRequest(
        model="tiny-ner", logits=tensors.encode(tokens), batch=_ner_batch(), texts=["anna"]
    )
    await _fails(stub.ClassifyTokens(request), INVALID, Reason.INVALID_INPUT, "logits", "NaN or infinite")


async def test_classify_and_rerank_arguments_are_checked(stub: Stub) -> None:
    classify = postprocess_pb2.ClassifyRequest(model="tiny-sentiment", logits=_floats(2, 4))
    await _fails(stub.Classify(classify), INVALID, Reason.INVALID_INPUT, "logits", "has 3 labels")
    classify = postprocess_pb2.ClassifyRequest(model="tiny-sentiment", logits=_floats(2, 3), top_k=-1)
    await _fails(stub.Classify(classify), INVALID, Reason.INVALID_INPUT, "top_k", "got -1")
    classify = postprocess_pb2.ClassifyRequest(model="tiny-sentiment", logits=_floats(0, 3))
    await _fails(stub.Classify(classify), INVALID, Reason.INVALID_INPUT, "logits", "at least one input")
    rerank = postprocess_pb2.RerankRequest(model="tiny-rerank", logits=_floats(2, 1), top_n=-3)
    await _fails(stub.Rerank(rerank), INVALID, Reason.INVALID_INPUT, "top_n", "got -3")
    rerank = postprocess_pb2.RerankRequest(model="tiny-rerank", logits=_floats(2, 3))
    await _fails(stub.Rerank(rerank), INVALID, Reason.INVALID_INPUT, "logits", "got 3")
    rerank = postprocess_pb2.RerankRequest(model="tiny-rerank", logits=_floats(2, 2))
    await _fails(stub.Rerank(rerank), INVALID, Reason.INVALID_INPUT, "logits", "has 1 labels")
    rerank = postprocess_pb2.RerankRequest(model="tiny-rerank", logits=_floats(2))
    await _fails(stub.Rerank(rerank), INVALID, Reason.INVALID_INPUT, "logits.shape", "expected 2 dimensions")


async def test_classify_tokens_inputs_must_agree(stub: Stub) -> None:
    def request(logits: tensor_pb2.Tensor | None = None, batch: Any = None, texts: Sequence[str] = ("anna",)) -> Any:
        return postprocess_pb2.ClassifyTokensRequest(
            model="tiny-ner",
            logits=logits if logits is not None else _floats(3, 5),
            batch=batch if batch is not None else _ner_batch(),
            texts=list(texts),
        )

    ok = await stub.ClassifyTokens(request())
    assert len(ok.results) == 1
    await _fails(stub.ClassifyTokens(request(logits=_floats(4, 5))), INVALID, Reason.INVALID_INPUT, "logits", "4 rows")
    await _fails(
        stub.ClassifyTokens(request(logits=_floats(3, 4))), INVALID, Reason.INVALID_INPUT, "logits", "5 labels"
    )
    await _fails(
        stub.ClassifyTokens(request(batch=_ner_batch(offsets=((0, 0), (0, 4), (4, 6), (0, 0))))),
        INVALID, Reason.INVALID_INPUT, "batch.offsets", "4 rows",
    )  # fmt: skip
    await _fails(
        stub.ClassifyTokens(request(batch=_ner_batch(offsets=((0, 0), (0, 9), (0, 0))))),
        INVALID, Reason.INVALID_INPUT, "batch.offsets", "outside its text",
    )  # fmt: skip
    await _fails(
        stub.ClassifyTokens(request(texts=["anna", "john"])), INVALID, Reason.INVALID_INPUT, "texts", "2 texts for 1"
    )
    await _fails(
        stub.ClassifyTokens(request(batch=_ner_batch(cu=(0, 2)))),
        INVALID, Reason.INVALID_INPUT, "logits", "3 rows but batch.cu_seqlens says 2",
    )  # fmt: skip
    no_offsets = _ner_batch()
    no_offsets.ClearField("offsets")
    await _fails(
        stub.ClassifyTokens(request(batch=no_offsets)), INVALID, Reason.INVALID_INPUT, "batch.offsets", "is required"
    )
    no_mask = _ner_batch()
    no_mask.ClearField("special_tokens_mask")
    await _fails(
        stub.ClassifyTokens(request(batch=no_mask)),
        INVALID, Reason.INVALID_INPUT, "batch.special_tokens_mask", "is required",
    )  # fmt: skip
