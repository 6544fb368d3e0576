"""The tokenizer stage over a real channel: ids, offsets, pairs, truncation and every error it can answer."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from services.common import tensors
from services.common.default_model import DEFAULT_MODEL_NAME, ensure_default_repository
from services.common.repository import ModelRepository
from services.common.server import start_server
from services.tokenizer.core import Tokenizer
from services.tokenizer.servicer import registrar
from tandem.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tests.status import details_of


@pytest.fixture(scope="module")
def default_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_default_repository(tmp_path_factory.mktemp("home"), chat_model=False)


@pytest.fixture(scope="module")
async def stub(default_repository: Path) -> AsyncIterator[tokenizer_pb2_grpc.TokenizerServiceAsyncStub]:
    core = Tokenizer(ModelRepository(default_repository), max_inputs=8)
    core.preload()
    running = await start_server("127.0.0.1:0", [registrar(core)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield tokenizer_pb2_grpc.TokenizerServiceStub(channel)
    await running.stop(0)


def reference(repo: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(repo / DEFAULT_MODEL_NAME / "1"))


@pytest.mark.parametrize("return_tokens", [True, False], ids=["with-tokens", "ids-only"])
async def test_ids_match_the_model_tokenizer(
    stub: tokenizer_pb2_grpc.TokenizerServiceAsyncStub, default_repository: Path, return_tokens: bool
) -> None:
    # Without tokens or offsets the core takes the tokenizer's encode_batch_fast path: the ids must not change.
    texts = ["Hello world!", "Tandem serves models over gRPC, café naïve.", "", "emoji 😀 and CJK 東京"]
    reply = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=texts, truncate=True, return_tokens=return_tokens))
    ids = tensors.decode(reply.batch.input_ids, "ids")
    types = tensors.decode(reply.batch.token_type_ids, "types")
    cu = tensors.decode(reply.batch.cu_seqlens, "cu")
    expected = reference(default_repository)(texts)
    assert [ids[a:b].tolist() for a, b in itertools.pairwise(cu)] == expected["input_ids"]
    assert types.tolist() == [t for row in expected["token_type_ids"] for t in row]
    assert reply.model == DEFAULT_MODEL_NAME and reply.version == "1"
    if return_tokens:
        assert list(reply.tokens[0].tokens) == ["[CLS]", "hello", "world", "!", "[SEP]"]
    else:
        assert not reply.tokens


async def test_offsets_and_special_tokens(stub: tokenizer_pb2_grpc.TokenizerServiceAsyncStub) -> None:
    text = "Amsterdam rocks"
    reply = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=[text], truncate=True, return_offsets=True))
    offsets = tensors.decode(reply.batch.offsets, "offsets")
    special = tensors.decode(reply.batch.special_tokens_mask, "special")
    words = tensors.decode(reply.batch.word_ids, "words")
    assert special.tolist() == [1, 0, 0, 1]
    assert [text[s:e] for s, e in offsets.tolist()] == ["", "Amsterdam", "rocks", ""]
    assert words.tolist() == [-1, 0, 1, -1]


async def test_pairs_get_segment_ids(
    stub: tokenizer_pb2_grpc.TokenizerServiceAsyncStub, default_repository: Path
) -> None:
    reply = await stub.Tokenize(
        tokenizer_pb2.TokenizeRequest(texts=["query", "query"], text_pairs=["a document", "b"], truncate=True)
    )
    types = tensors.decode(reply.batch.token_type_ids, "types")
    expected = reference(default_repository)(["query", "query"], ["a document", "b"])["token_type_ids"]
    assert types.tolist() == [t for row in expected for t in row]


async def test_truncation_keeps_the_model_limit(stub: tokenizer_pb2_grpc.TokenizerServiceAsyncStub) -> None:
    long_text = "word " * 600
    reply = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=[long_text], truncate=True))
    assert tensors.decode(reply.batch.cu_seqlens, "cu").tolist() == [0, 256]


async def test_too_long_without_truncation_names_the_input(stub: tokenizer_pb2_grpc.TokenizerServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=["short", "word " * 600], truncate=False))
    d = details_of(caught.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert d.reason == "INPUT_TOO_LONG" and d.fields == ["inputs[1]"]
    assert "more than the model's limit of 256" in d.message


@pytest.mark.parametrize(
    ("request_kwargs", "code", "reason", "fields", "message"),
    [
        ({"texts": []}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", ["inputs"], "at least one input"),
        ({"texts": ["a"] * 9}, grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_INPUTS", ["inputs"], "limit of 8"),
        (
            {"texts": ["a", "b"], "text_pairs": ["x"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_INPUT",
            ["text_pairs"],
            "1 pair",
        ),
        ({"texts": ["a"], "model": "nope"}, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", [], "model 'nope' not found"),
        (
            {"texts": ["a"], "model": f"{DEFAULT_MODEL_NAME}:7"},
            grpc.StatusCode.NOT_FOUND,
            "MODEL_NOT_FOUND",
            [],
            "no version 7",
        ),
        (
            {"texts": ["a"], "model": f"{DEFAULT_MODEL_NAME}:x"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_INPUT",
            ["model"],
            "must be a number",
        ),
        (
            {"texts": ["a"], "model": "../etc"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_INPUT",
            ["model"],
            "model name must be 1-128 ASCII letters",
        ),
    ],
)
async def test_bad_requests(
    stub: tokenizer_pb2_grpc.TokenizerServiceAsyncStub,
    request_kwargs: dict[str, Any],
    code: grpc.StatusCode,
    reason: str,
    fields: list[str],
    message: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Tokenize(tokenizer_pb2.TokenizeRequest(**request_kwargs))
    d = details_of(caught.value)
    assert (d.code, d.reason, d.fields) == (code, reason, fields)
    assert message in d.message
    # The service keeps answering correctly after a bad request.
    ok = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=["hello"], truncate=True))
    assert tensors.decode(ok.batch.cu_seqlens, "cu").tolist() == [0, 3]


async def test_detokenize(stub: tokenizer_pb2_grpc.TokenizerServiceAsyncStub) -> None:
    reply = await stub.Detokenize(tokenizer_pb2.DetokenizeRequest(ids=[101, 7592, 2088, 102], skip_special_tokens=True))
    assert reply.text == "hello world"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Detokenize(tokenizer_pb2.DetokenizeRequest(ids=[1, -5]))
    d = details_of(caught.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT and d.fields == ["ids"] and "-5" in d.message


async def test_large_batches_run_off_the_event_loop(stub: tokenizer_pb2_grpc.TokenizerServiceAsyncStub) -> None:
    texts = [f"sentence number {i} " * 40 for i in range(8)]
    reply = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=texts, truncate=True))
    cu = tensors.decode(reply.batch.cu_seqlens, "cu")
    assert len(cu) == 9 and np.all(np.diff(cu) > 0)


async def test_health_and_reflection(default_repository: Path) -> None:
    core = Tokenizer(ModelRepository(default_repository))
    running = await start_server("127.0.0.1:0", [registrar(core)])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="tandem.tokenizer.v1.TokenizerService"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = [s.name async for r in call for s in r.list_services_response.service]
            assert "tandem.tokenizer.v1.TokenizerService" in names and "grpc.health.v1.Health" in names
    finally:
        await running.stop(0)


async def test_unix_socket(default_repository: Path, tmp_path: Path) -> None:
    core = Tokenizer(ModelRepository(default_repository))
    running = await start_server(f"unix:{tmp_path}/tok.sock", [registrar(core)])
    try:
        async with grpc.aio.insecure_channel(f"unix:{tmp_path}/tok.sock") as channel:
            reply = await tokenizer_pb2_grpc.TokenizerServiceStub(channel).Tokenize(
                tokenizer_pb2.TokenizeRequest(texts=["hi"], truncate=True)
            )
            assert tensors.decode(reply.batch.cu_seqlens, "cu").tolist() == [0, 3]
    finally:
        await running.stop(0)
