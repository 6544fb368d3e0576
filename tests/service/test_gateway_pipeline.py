"""The gateway over real in-process stages on tiny trained models: every task, coalescing, and stage failures."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from gateway.__main__ import follow_stage_health
from gateway.clients import InferenceClient, PostprocessClient, TokenizerClient
from gateway.core import Pipeline
from gateway.servicer import registrar as gateway_registrar
from services.common.repository import ModelRepository
from services.common.server import start_server
from services.inference.core import Inference
from services.inference.servicer import registrar as inference_registrar
from services.postprocess.core import Postprocessor
from services.postprocess.servicer import registrar as postprocess_registrar
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.inference.v1 import inference_pb2
from tests.fixtures import reference, tiny_models
from tests.harness import Stack, await_health
from tests.status import details_of

MiB = 1024 * 1024


def version_dir(repository: Path, name: str) -> Path:
    return repository / name / "1"


@pytest.mark.parametrize("name", ["tiny-embed", "tiny-embed-cls"])
async def test_embeddings_match_reference(stack: Stack, name: str) -> None:
    texts = tiny_models.embedding_texts(n=12)
    reply = await stack.stub.Embed(gateway_pb2.EmbedRequest(model=name, inputs=texts))
    served = np.array([e.values for e in reply.embeddings], dtype=np.float32)
    expected = reference.reference_embeddings(version_dir(stack.repository, name), texts)
    assert served.shape == expected.shape
    assert np.sum(served * expected, axis=1).min() >= 0.9999
    assert reply.model == name and reply.model_version == "1"


async def test_pooling_is_the_models_own(stack: Stack) -> None:
    """Same weights pooled two ways must differ, so a wrong pooling cannot pass the test above."""
    texts = tiny_models.embedding_texts(n=4)
    mean = await stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=texts))
    cls = reference.reference_embeddings(version_dir(stack.repository, "tiny-embed-cls"), texts)
    served = np.array([e.values for e in mean.embeddings])
    assert np.sum(served * cls, axis=1).max() < 0.999 or not np.allclose(served, cls, atol=1e-3)


async def test_classification_is_right(stack: Stack) -> None:
    examples = tiny_models.classifier_examples(seed=7, n=40)
    texts = [t for t, _ in examples]
    reply = await stack.stub.Classify(gateway_pb2.ClassifyRequest(model="tiny-sentiment", inputs=texts))
    assert [r.labels[0].label for r in reply.results] == [label for _, label in examples]
    expected = reference.reference_classify(version_dir(stack.repository, "tiny-sentiment"), texts)
    for result, ref in zip(reply.results, expected, strict=True):
        assert [s.label for s in result.labels] == [label for label, _ in ref]
        assert [s.score for s in result.labels] == pytest.approx([score for _, score in ref], abs=1e-4)
    top = await stack.stub.Classify(gateway_pb2.ClassifyRequest(model="tiny-sentiment", inputs=texts[:2], top_k=1))
    assert [len(r.labels) for r in top.results] == [1, 1]


async def test_multi_label_uses_sigmoid(stack: Stack) -> None:
    examples = tiny_models.multilabel_examples(seed=3, n=20)
    texts = [t for t, _ in examples]
    reply = await stack.stub.Classify(gateway_pb2.ClassifyRequest(model="tiny-topics", inputs=texts))
    for result, (_, on) in zip(reply.results, examples, strict=True):
        assert sorted(s.label for s in result.labels if s.score > 0.5) == sorted(on)
    expected = reference.reference_classify(version_dir(stack.repository, "tiny-topics"), texts)
    for result, ref in zip(reply.results, expected, strict=True):
        assert [s.label for s in result.labels] == [label for label, _ in ref]
        assert [s.score for s in result.labels] == pytest.approx([score for _, score in ref], abs=1e-4)


async def test_entities_are_right(stack: Stack) -> None:
    examples = tiny_models.ner_examples(seed=5, n=20)
    texts = [t for t, _ in examples]
    reply = await stack.stub.ClassifyTokens(gateway_pb2.ClassifyTokensRequest(model="tiny-ner", inputs=texts))
    expected = reference.reference_ner(version_dir(stack.repository, "tiny-ner"), texts)
    correct = 0
    for result, ref, (text, truth) in zip(reply.results, expected, examples, strict=True):
        got = [(e.label, e.start, e.end, e.text) for e in result.entities]
        assert got == [(r["entity_group"], r["start"], r["end"], text[r["start"] : r["end"]]) for r in ref]
        assert [e.score for e in result.entities] == pytest.approx([r["score"] for r in ref], abs=1e-4)
        correct += [(e.text, e.label) for e in result.entities] == truth
    assert correct >= 0.9 * len(examples)


async def test_rerank_is_right(stack: Stack) -> None:
    for query, documents, relevant in tiny_models.rerank_examples(seed=9, n=8):
        reply = await stack.stub.Rerank(
            gateway_pb2.RerankRequest(model="tiny-rerank", query=query, documents=documents, return_documents=True)
        )
        assert reply.results[0].index == relevant
        assert reply.results[0].document == documents[relevant]
        scores = reference.reference_rerank(version_dir(stack.repository, "tiny-rerank"), query, documents)
        assert {r.index: r.score for r in reply.results} == pytest.approx(dict(enumerate(scores)), abs=1e-4)
        assert [r.score for r in reply.results] == sorted((r.score for r in reply.results), reverse=True)
    top = await stack.stub.Rerank(
        gateway_pb2.RerankRequest(model="tiny-rerank", query="x", documents=["a", "b", "c"], top_n=2)
    )
    assert len(top.results) == 2


async def test_concurrent_callers_get_their_own_rows(stack: Stack) -> None:
    texts = tiny_models.embedding_texts(seed=11, n=60)
    requests = [texts[i : i + 1 + i % 4] for i in range(40)]
    runs_before = stack.pipeline._embeds.runs
    replies = await asyncio.gather(
        *(stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=r)) for r in requests)
    )
    for request, reply in zip(requests, replies, strict=True):
        expected = reference.reference_embeddings(version_dir(stack.repository, "tiny-embed"), request)
        served = np.array([e.values for e in reply.embeddings])
        assert np.sum(served * expected, axis=1).min() >= 0.9999
        assert reply.usage.prompt_tokens > 0
    assert stack.pipeline._embeds.runs - runs_before < len(requests)


@pytest.mark.parametrize(
    ("call", "code", "reason", "fields", "message"),
    [
        ("Embed", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", ["inputs"], "at least one entry"),
        ("EmbedTooMany", grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_INPUTS", ["inputs"], "limit of 100"),
        ("EmbedWithClassifier", grpc.StatusCode.INVALID_ARGUMENT, "WRONG_TASK", ["model"], "needs an embedding model"),
        ("ClassifyNegativeTopK", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", ["top_k"], "top_k"),
        ("RerankNoDocuments", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", ["documents"], "documents"),
        ("UnknownVersion", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", [], "no version 9"),
        ("NoDefaultModel", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", ["model"], "no default model"),
        ("TooLong", grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LONG", ["inputs[1]"], "limit of 64"),
    ],
)
async def test_errors(
    stack: Stack, call: str, code: grpc.StatusCode, reason: str, fields: list[str], message: str
) -> None:
    stub = stack.stub
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "Embed": lambda: stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=[])),
        "EmbedTooMany": lambda: stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["a"] * 101)),
        "EmbedWithClassifier": lambda: stub.Embed(gateway_pb2.EmbedRequest(model="tiny-sentiment", inputs=["a"])),
        "ClassifyNegativeTopK": lambda: stub.Classify(
            gateway_pb2.ClassifyRequest(model="tiny-sentiment", inputs=["a"], top_k=-1)
        ),
        "RerankNoDocuments": lambda: stub.Rerank(gateway_pb2.RerankRequest(model="tiny-rerank", query="q")),
        "UnknownVersion": lambda: stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed:9", inputs=["a"])),
        "NoDefaultModel": lambda: stub.Embed(gateway_pb2.EmbedRequest(inputs=["a"])),
        "TooLong": lambda: stub.Embed(
            gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["good", "good " * 100], truncate=False)
        ),
    }
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await calls[call]()
    d = details_of(caught.value)
    assert (d.code, d.reason, d.fields) == (code, reason, fields)
    assert message in d.message


async def test_deadline_exceeded(stack: Stack) -> None:
    texts = tiny_models.embedding_texts(n=50)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=texts), timeout=0.0005)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_stage_that_is_down_fails_fast_and_recovers(stack: Stack) -> None:
    """Unavailable postprocess: UNAVAILABLE quickly, gateway NOT_SERVING; back to SERVING once it returns."""
    watcher = asyncio.create_task(follow_stage_health(stack.gateway, stack.pipeline, interval_s=0.1))
    address = stack.stages["postprocess"].address
    postprocess = Postprocessor(ModelRepository(stack.repository))
    try:
        await stack.stages["postprocess"].stop(0)
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["good"]), timeout=20)
        assert time.monotonic() - start < 5
        d = details_of(caught.value)
        assert (d.code, d.reason) == (grpc.StatusCode.UNAVAILABLE, "STAGE_UNAVAILABLE")
        assert "postprocess" in d.message
        async with grpc.aio.insecure_channel(stack.gateway.address) as channel:
            await await_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING, attempts=100)
            stack.stages["postprocess"] = await start_server(address, [postprocess_registrar(postprocess)])
            await await_health(channel, health_pb2.HealthCheckResponse.SERVING)
        reply = await stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["good"]), timeout=20)
        assert len(reply.embeddings) == 1
    finally:
        watcher.cancel()


async def test_list_and_get_models(stack: Stack) -> None:
    models = (await stack.stub.ListModels(gateway_pb2.ListModelsRequest())).models
    names = [m.name for m in models]
    assert names == sorted(names) and {"tiny-embed", "tiny-ner", "tiny-rerank", "tiny-sentiment"} <= set(names)
    info = (await stack.stub.GetModel(gateway_pb2.GetModelRequest(model="tiny-ner"))).model
    assert list(info.labels) == tiny_models.NER_LABELS and info.ready
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.GetModel(gateway_pb2.GetModelRequest(model="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


class _InferenceClient(InferenceClient):
    """The gateway's inference client, noting whether each answer came pooled. With `old_stage`, `pool` never reaches
    the stage, as with an inference stage from before InferRequest.pool: it answers token rows."""

    def __init__(self, target: str, old_stage: bool = False) -> None:
        super().__init__(target, 64 * MiB)
        self.old_stage = old_stage
        self.pooled: list[bool] = []

    async def infer(self, request: inference_pb2.InferRequest, deadline: float) -> inference_pb2.InferResponse:
        if self.old_stage:
            request.pool = False
        response = await super().infer(request, deadline)
        self.pooled.append(response.pooled)
        return response


@contextlib.asynccontextmanager
async def _gateway(stack: Stack, inference: InferenceClient) -> AsyncIterator[gateway_pb2_grpc.GatewayServiceAsyncStub]:
    pipeline = Pipeline(
        TokenizerClient(stack.stages["tokenizer"].address, 64 * MiB),
        inference,
        PostprocessClient(stack.stages["postprocess"].address, 64 * MiB),
        max_inputs=100,
    )
    server = await start_server("127.0.0.1:0", [gateway_registrar(pipeline)])
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield gateway_pb2_grpc.GatewayServiceStub(channel)
    finally:
        await server.stop(0)
        await pipeline.close()


def _vectors(reply: gateway_pb2.EmbedResponse) -> np.ndarray:
    return np.array([e.values for e in reply.embeddings], dtype=np.float32)


async def test_embeddings_are_pooled_by_the_inference_stage_and_token_rows_from_an_older_one_still_work(
    stack: Stack,
) -> None:
    texts = tiny_models.embedding_texts(seed=17, n=9)
    expected = reference.reference_embeddings(version_dir(stack.repository, "tiny-embed"), texts)
    for old_stage in (False, True):
        client = _InferenceClient(stack.stages["inference"].address, old_stage)
        async with _gateway(stack, client) as stub:
            for normalize in (True, False):
                request = gateway_pb2.EmbedRequest(model="tiny-embed", inputs=texts, normalize=normalize)
                served = _vectors(await stub.Embed(request))
                want = (
                    expected
                    if normalize
                    else reference.reference_embeddings(
                        version_dir(stack.repository, "tiny-embed"), texts, normalize=False
                    )
                )
                np.testing.assert_allclose(served, want, rtol=1e-4, atol=1e-5)
        assert client.pooled == [not old_stage] * 2


async def test_a_batch_whose_token_rows_outgrow_the_message_limit_is_embedded(stack: Stack, tmp_path: Path) -> None:
    """100 texts of the tiny model make ~1,000 token rows of 32 floats (~128 KB): more than an inference stage
    limited to 32 KiB messages may send. Pooled there, 100 rows of 32 floats (12.8 KB) cross the hop."""
    inference = Inference(ModelRepository(stack.repository), home=tmp_path, intra_op_threads=1)
    await inference.start()
    small = await start_server("127.0.0.1:0", [inference_registrar(inference)], max_message_bytes=32 * 1024)
    texts = tiny_models.embedding_texts(seed=23, n=100)
    try:
        async with _gateway(stack, _InferenceClient(small.address)) as stub:
            reply = await stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=texts))
        expected = reference.reference_embeddings(version_dir(stack.repository, "tiny-embed"), texts)
        np.testing.assert_allclose(_vectors(reply), expected, rtol=1e-4, atol=1e-5)
        assert reply.usage.prompt_tokens * 32 * 4 > 32 * 1024
        # The same batch as token rows does not fit: what every Embed of long texts met before.
        async with _gateway(stack, _InferenceClient(small.address, old_stage=True)) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=texts))
        d = details_of(caught.value)
        assert (d.code, d.reason, d.retry_delay_s) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MESSAGE_TOO_LARGE", None)
        assert "the inference stage is over the stage message size limit" in d.message, d
        assert "Sent message larger than max" in d.message, d
    finally:
        await small.stop(0)
        await inference.close()


async def test_the_model_catalog_stays_fresh_for_models_in_use(
    served_repository: Path, tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A model asked for recently is read again in the background before its entry expires, so a request arriving
    after a pause finds a fresh entry; one no longer asked for is left to expire; one that is gone is dropped. The
    background reads are logged under the catalog's own request id, not under the request that started them."""
    import asyncio
    import logging
    import shutil
    import time

    from gateway.core import CATALOG_REQUEST_ID
    from tests.harness import serve_stack

    repository = tmp_path_factory.mktemp("catalog-repository")
    shutil.copytree(served_repository / "tiny-embed", repository / "tiny-embed")
    shutil.copytree(served_repository / "tiny-embed", repository / "gone-soon")
    async with serve_stack(
        repository, tmp_path_factory.mktemp("home"), pipeline_options={"model_cache_ttl_s": 0.3}
    ) as stack:
        catalog = stack.pipeline.catalog
        catalog.keep_warm_s = 1.5
        for model in ("tiny-embed", "gone-soon"):
            await stack.stub.Embed(
                gateway_pb2.EmbedRequest(model=model, inputs=["a"]), metadata=(("x-request-id", "starter"),)
            )
        shutil.rmtree(repository / "gone-soon")
        with caplog.at_level(logging.DEBUG, logger="services.common.server"):
            await asyncio.sleep(1.0)  # over three TTLs
        reads = [r for r in caplog.records if "InferenceService/GetModel called" in r.getMessage()]
        assert reads and {getattr(r, "request_id") for r in reads} == {CATALOG_REQUEST_ID}  # noqa: B009
        assert catalog._cache["tiny-embed"][0] > time.monotonic(), "read again before it expired"
        assert "gone-soon" not in catalog._cache, "the stage no longer knows it: dropped"
        await asyncio.sleep(2.0)  # past keep_warm_s without a request: no longer refreshed
        assert catalog._cache["tiny-embed"][0] < time.monotonic()
