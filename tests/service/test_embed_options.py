"""EmbedRequest.dimensions (Matryoshka truncation, then normalization) and prompt_name (a named instruction prefix
from config_sentence_transformers.json, as sentence-transformers applies it), against an in-process reference."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tandem.gateway.v1 import gateway_pb2
from tests.fixtures import reference, tiny_models
from tests.harness import Stack, serve_stack
from tests.status import details_of

TEXTS = ["a short text", "another somewhat longer text about the weather"]
# Words of the tiny tokenizer's vocabulary, so that the two prompts really tokenize differently.
PROMPTS = {"query": "we asked: ", "passage": "they said: "}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny embedders: `mrl` declares Matryoshka sizes and has prompts (default `passage`); `plain` neither."""
    root = tmp_path_factory.mktemp("embed-options")
    mrl = tiny_models.make_embedding_model(root, name="mrl", seed=3)
    config = json.loads((mrl / "tandem.json").read_text())
    config["matryoshka_dimensions"] = [16, 8]
    (mrl / "tandem.json").write_text(json.dumps(config))
    (mrl / "1" / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": PROMPTS, "default_prompt_name": "passage"})
    )
    tiny_models.make_embedding_model(root, name="plain", seed=4)
    return root


@pytest.fixture(scope="module")
async def stack(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with serve_stack(repository, tmp_path_factory.mktemp("home")) as running:
        yield running


def _reference(repository: Path, name: str, texts: list[str], dimensions: int | None, normalize: bool) -> np.ndarray:
    rows = reference.reference_embeddings(repository / name / "1", texts, normalize=False)
    if dimensions:
        rows = rows[:, :dimensions]
    if normalize:
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return rows


async def _embed(stack: Stack, **fields: object) -> np.ndarray:
    reply = await stack.stub.Embed(gateway_pb2.EmbedRequest(inputs=TEXTS, **fields))  # type: ignore[arg-type]
    return np.array([list(e.values) for e in reply.embeddings], dtype=np.float32)


@pytest.mark.parametrize("normalize", [True, False])
async def test_dimensions_cut_then_normalize(stack: Stack, repository: Path, normalize: bool) -> None:
    got = await _embed(stack, model="mrl", dimensions=8, normalize=normalize, prompt_name="query")
    want = _reference(repository, "mrl", [PROMPTS["query"] + t for t in TEXTS], 8, normalize)
    assert got.shape == (2, 8)
    np.testing.assert_allclose(got, want, atol=1e-5)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


async def test_prompts_default_named_and_in_the_model_description(stack: Stack, repository: Path) -> None:
    default = await _embed(stack, model="mrl")
    np.testing.assert_allclose(
        default, _reference(repository, "mrl", [PROMPTS["passage"] + t for t in TEXTS], None, True), atol=1e-5
    )
    query = await _embed(stack, model="mrl", prompt_name="query")
    np.testing.assert_allclose(
        query, _reference(repository, "mrl", [PROMPTS["query"] + t for t in TEXTS], None, True), atol=1e-5
    )
    assert not np.allclose(default, query)
    info = (await stack.stub.GetModel(gateway_pb2.GetModelRequest(model="mrl"))).model
    assert (dict(info.prompts), info.default_prompt_name, list(info.matryoshka_dimensions)) == (
        PROMPTS,
        "passage",
        [16, 8],
    )
    plain = (await stack.stub.GetModel(gateway_pb2.GetModelRequest(model="plain"))).model
    assert (dict(plain.prompts), plain.default_prompt_name, list(plain.matryoshka_dimensions)) == ({}, "", [])


async def test_a_model_without_matryoshka_training_is_cut_only_when_forced(stack: Stack, repository: Path) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _embed(stack, model="plain", dimensions=8)
    d = details_of(caught.value)
    assert (d.code, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["dimensions"])
    assert "model 'plain' declares no Matryoshka training" in d.message and "force_dimensions" in d.message
    got = await _embed(stack, model="plain", dimensions=8, force_dimensions=True)
    np.testing.assert_allclose(got, _reference(repository, "plain", TEXTS, 8, True), atol=1e-5)


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"model": "mrl", "dimensions": 33}, "dimensions", "dimensions 33 is larger than model 'mrl'"),
        ({"model": "mrl", "dimensions": 0}, "dimensions", "dimensions must be at least 1"),
        ({"model": "mrl", "dimensions": -4}, "dimensions", "dimensions must be at least 1"),
        (
            {"model": "mrl", "prompt_name": "nope"},
            "prompt_name",
            "model 'mrl' has no prompt 'nope'; its prompts: 'passage', 'query'",
        ),
        (
            {"model": "plain", "prompt_name": "query"},
            "prompt_name",
            "model 'plain' has no prompt 'query'; its prompts: none",
        ),
    ],
)
async def test_bad_options_are_invalid_argument(
    stack: Stack, fields: dict[str, object], field: str, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _embed(stack, **fields)
    d = details_of(caught.value)
    assert (d.code, d.reason, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", [field])
    assert message in d.message
