"""The Open Inference Protocol on the gateway, through its generated stub: over real in-process stages on the tiny
models: server and model metadata, the repository through the registry, answers equal to the native API's, streams,
statistics, readiness that follows the stages.

test_oip_errors.py checks every refusal on the same kind of stack; test_oip_tritonclient.py drives it with the real
tritonclient package.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import struct
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.repository import ModelRepository
from services.common.server import start_server
from services.postprocess.core import Postprocessor
from services.postprocess.servicer import registrar as postprocess_registrar
from tandem.gateway.v1 import gateway_pb2
from tandem.oip.v2 import grpc_service_pb2 as pb
from tests.fixtures import tiny_models
from tests.harness import Stack, serve_stack
from tests.status import details_of

MAX_INPUTS = 100


def serve_oip_stack(repository: Path, home: Path) -> contextlib.AbstractAsyncContextManager[Stack]:
    """The stack this module and test_oip_tritonclient.py serve: idle models unload after 0.2 s, so that unloads
    through the registry can be seen."""
    return serve_stack(
        repository, home, inference_options={"unload_idle_s": 0.2}, pipeline_options={"max_inputs": MAX_INPUTS}
    )


@pytest.fixture(scope="module")
async def stack(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with serve_oip_stack(served_repository, tmp_path_factory.mktemp("home")) as running:
        yield running


# ----------------------------------------------------------------------------------------------------------------------
# Building requests by hand


def raw_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES in raw form, written here independently of the server's codec: 4-byte LE length, then the bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def text_input(
    name: str, texts: Sequence[str | bytes], shape: Sequence[int] | None = None
) -> pb.ModelInferRequest.InferInputTensor:
    data = [t.encode() if isinstance(t, str) else t for t in texts]
    return pb.ModelInferRequest.InferInputTensor(
        name=name,
        datatype="BYTES",
        shape=list(shape) if shape is not None else [len(data)],
        contents=pb.InferTensorContents(bytes_contents=data),
    )


def infer_request(
    model: str,
    inputs: dict[str, Sequence[str | bytes]],
    *,
    raw: bool = False,
    column: bool = False,
    version: str = "",
    request_id: str = "",
    outputs: Sequence[str] = (),
    **parameters: bool | int | str,
) -> pb.ModelInferRequest:
    """A ModelInfer request with typed contents, or with raw_input_contents when `raw`; shape [n, 1] when `column`."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, texts in inputs.items():
        tensor = text_input(name, texts, [len(texts), 1] if column else None)
        if raw:
            request.raw_input_contents.append(raw_bytes(list(tensor.contents.bytes_contents)))
            tensor.ClearField("contents")
        request.inputs.append(tensor)
    for key, value in parameters.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        elif isinstance(value, int):
            request.parameters[key].int64_param = value
        else:
            request.parameters[key].string_param = value
    request.outputs.extend(pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs)
    return request


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Decodes raw_output_contents (FP32, INT64, BYTES) independently of the server's codec."""
    assert len(response.raw_output_contents) == len(response.outputs)
    assert all(not o.HasField("contents") for o in response.outputs)
    found: dict[str, np.ndarray] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        shape = tuple(tensor.shape)
        if tensor.datatype == "BYTES":
            elements, offset = [], 0
            while offset < len(raw):
                (length,) = struct.unpack_from("<I", raw, offset)
                elements.append(raw[offset + 4 : offset + 4 + length])
                offset += 4 + length
            found[tensor.name] = np.array(elements, dtype=np.object_).reshape(shape)
        else:
            dtype = {"FP32": "<f4", "INT64": "<i8"}[tensor.datatype]
            found[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return found


# ----------------------------------------------------------------------------------------------------------------------
# Server, models, metadata


async def test_reflection_lists_both_services(stack: Stack) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(stack.channel)

    async def ask(**request: str) -> reflection_pb2.ServerReflectionResponse:
        async for reply in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)])):
            return reply
        raise AssertionError("no reflection reply")

    listed = {s.name for s in (await ask(list_services="")).list_services_response.service}
    assert {"inference.GRPCInferenceService", "tandem.gateway.v1.GatewayService"} <= listed
    files = (await ask(file_containing_symbol="inference.GRPCInferenceService")).file_descriptor_response
    assert files.file_descriptor_proto  # grpcurl can call it with no proto files


async def test_server_live_ready_and_metadata(stack: Stack) -> None:
    assert (await stack.oip.ServerLive(pb.ServerLiveRequest())).live
    assert (await stack.oip.ServerReady(pb.ServerReadyRequest())).ready
    meta = await stack.oip.ServerMetadata(pb.ServerMetadataRequest())
    assert (meta.name, meta.version) == ("tandem", importlib.metadata.version("tandem"))
    assert list(meta.extensions) == ["parameters", "statistics"]


async def test_model_ready(stack: Stack) -> None:
    ready = stack.oip.ModelReady
    assert (await ready(pb.ModelReadyRequest(name="tiny-embed"))).ready
    assert (await ready(pb.ModelReadyRequest(name="tiny-embed", version="1"))).ready
    assert not (await ready(pb.ModelReadyRequest(name="nope"))).ready
    assert not (await ready(pb.ModelReadyRequest(name="tiny-embed", version="9"))).ready
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ready(pb.ModelReadyRequest(name="tiny-embed", version="one"))
    d = details_of(caught.value)
    assert (d.code, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["version"])


@pytest.mark.parametrize(
    ("model", "platform", "inputs", "outputs"),
    [
        ("tiny-embed", "tandem_embedding", [("text", "BYTES", [-1])], [("embedding", "FP32", [-1, "dim"])]),
        (
            "tiny-sentiment",
            "tandem_classification",
            [("text", "BYTES", [-1])],
            [("scores", "FP32", [-1, -1]), ("labels", "BYTES", [-1, -1])],
        ),
        ("tiny-ner", "tandem_token_classification", [("text", "BYTES", [-1])], [("entities", "BYTES", [-1])]),
        (
            "tiny-rerank",
            "tandem_rerank",
            [("query", "BYTES", [1]), ("text", "BYTES", [-1])],
            [("scores", "FP32", [-1]), ("ranking", "INT64", [-1])],
        ),
    ],
)
async def test_model_metadata(
    stack: Stack, model: str, platform: str, inputs: list[tuple[Any, ...]], outputs: list[tuple[Any, ...]]
) -> None:
    info = (await stack.stub.GetModel(gateway_pb2.GetModelRequest(model=model))).model
    meta = await stack.oip.ModelMetadata(pb.ModelMetadataRequest(name=model))
    assert (meta.name, list(meta.versions), meta.platform) == (model, list(info.versions), platform)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == inputs
    dims = {"dim": info.embedding_dimension}
    expected = [(n, d, [dims.get(x, x) for x in s]) for n, d, s in outputs]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == expected
    pinned = await stack.oip.ModelMetadata(pb.ModelMetadataRequest(name=model, version="1"))
    assert pinned == meta


async def test_repository_index_and_load(stack: Stack) -> None:
    index = await stack.oip.RepositoryIndex(pb.RepositoryIndexRequest())
    names = ["tiny-embed", "tiny-embed-cls", "tiny-ner", "tiny-rerank", "tiny-sentiment", "tiny-topics"]
    assert [(m.name, m.version, m.state, m.reason) for m in index.models] == [(n, "1", "READY", "") for n in names]
    ready_only = await stack.oip.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert ready_only == index
    await stack.oip.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny-embed"))


async def test_unload_and_load_through_the_registry(stack: Stack) -> None:
    """Unload takes the model out of service (index UNAVAILABLE, not ready, inference refused); load brings it back."""
    texts = ["unload me", "and back"]
    before = outputs_of(await stack.oip.ModelInfer(infer_request("tiny-topics", {"text": texts})))
    unload = pb.RepositoryModelUnloadRequest(model_name="tiny-topics")
    unload.parameters["unload_dependents"].bool_param = False  # Triton's one unload parameter is accepted
    await stack.oip.RepositoryModelUnload(unload)
    ready = await stack.oip.ModelReady(pb.ModelReadyRequest(name="tiny-topics"))
    assert ready.ready is False
    index = await stack.oip.RepositoryIndex(pb.RepositoryIndexRequest())
    states = {m.name: (m.version, m.state, m.reason) for m in index.models}
    assert states["tiny-topics"][:2] == ("1", "UNAVAILABLE")
    assert "unload" in states["tiny-topics"][2]
    assert states["tiny-embed"] == ("1", "READY", "")
    ready_only = await stack.oip.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert "tiny-topics" not in [m.name for m in ready_only.models]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.oip.ModelInfer(infer_request("tiny-topics", {"text": texts}))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # retrying will not help until it is loaded
    assert "tiny-topics:1 is not loaded: unloaded on request" in (caught.value.details() or "")

    await stack.oip.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny-topics"))
    assert (await stack.oip.ModelReady(pb.ModelReadyRequest(name="tiny-topics"))).ready is True
    after = outputs_of(await stack.oip.ModelInfer(infer_request("tiny-topics", {"text": texts})))
    assert after.keys() == before.keys()
    np.testing.assert_allclose(after["scores"], before["scores"], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Inference: the same answers as the native API


@pytest.mark.parametrize(("raw", "column"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("normalize", [True, False])
async def test_embeddings_equal_native(stack: Stack, raw: bool, column: bool, normalize: bool) -> None:
    texts = [*tiny_models.embedding_texts(seed=3, n=5), "naïve café ☕"]
    reply = await stack.oip.ModelInfer(
        infer_request("tiny-embed", {"text": texts}, raw=raw, column=column, request_id="e1", normalize=normalize)
    )
    native = await stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=texts, normalize=normalize))
    expected = np.array([e.values for e in native.embeddings], dtype=np.float32)
    served = outputs_of(reply)
    assert list(served) == ["embedding"]
    assert served["embedding"].shape == expected.shape
    np.testing.assert_allclose(served["embedding"], expected, rtol=0, atol=1e-6)
    assert (reply.model_name, reply.model_version, reply.id) == ("tiny-embed", "1", "e1")


async def test_classification_equals_native(stack: Stack) -> None:
    texts = [t for t, _ in tiny_models.classifier_examples(seed=4, n=9)]
    reply = await stack.oip.ModelInfer(infer_request("tiny-sentiment", {"text": texts}, raw=True))
    native = await stack.stub.Classify(gateway_pb2.ClassifyRequest(model="tiny-sentiment", inputs=texts))
    served = outputs_of(reply)
    n_labels = len(tiny_models.SENTIMENT_LABELS)
    assert served["scores"].shape == served["labels"].shape == (len(texts), n_labels)
    for row, (scores, labels) in enumerate(zip(served["scores"], served["labels"], strict=True)):
        expected = native.results[row].labels
        assert [label.decode() for label in labels] == [s.label for s in expected]
        np.testing.assert_allclose(scores, [s.score for s in expected], rtol=0, atol=1e-6)
        assert list(scores) == sorted(scores, reverse=True)

    top = await stack.oip.ModelInfer(
        infer_request("tiny-sentiment", {"text": texts[:3]}, column=True, outputs=["labels"], top_k=1)
    )
    assert [o.name for o in top.outputs] == ["labels"]
    assert [[x.decode()] for x in outputs_of(top)["labels"][:, 0]] == [[r.labels[0].label] for r in native.results[:3]]


async def test_multi_label_classification_equals_native(stack: Stack) -> None:
    texts = [t for t, _ in tiny_models.multilabel_examples(seed=2, n=5)]
    reply = await stack.oip.ModelInfer(infer_request("tiny-topics", {"text": texts}, top_k=2))
    native = await stack.stub.Classify(gateway_pb2.ClassifyRequest(model="tiny-topics", inputs=texts, top_k=2))
    served = outputs_of(reply)
    assert served["scores"].shape == (5, 2)
    for row in range(5):
        assert [x.decode() for x in served["labels"][row]] == [s.label for s in native.results[row].labels]
        np.testing.assert_allclose(served["scores"][row], [s.score for s in native.results[row].labels], atol=1e-6)


async def test_entities_equal_native(stack: Stack) -> None:
    texts = [t for t, _ in tiny_models.ner_examples(seed=6, n=8)]
    reply = await stack.oip.ModelInfer(infer_request("tiny-ner", {"text": texts}, raw=True))
    native = await stack.stub.ClassifyTokens(gateway_pb2.ClassifyTokensRequest(model="tiny-ner", inputs=texts))
    served = outputs_of(reply)["entities"]
    assert served.shape == (len(texts),)
    assert sum(len(json.loads(x)) for x in served) > 0
    for element, result in zip(served, native.results, strict=True):
        got = json.loads(element.decode())
        assert [(e["label"], e["start"], e["end"], e["text"]) for e in got] == [
            (e.label, e.start, e.end, e.text) for e in result.entities
        ]
        assert [e["score"] for e in got] == pytest.approx([e.score for e in result.entities], abs=1e-7)


async def test_rerank_equals_native(stack: Stack) -> None:
    for query, documents, relevant in tiny_models.rerank_examples(seed=8, n=4):
        reply = await stack.oip.ModelInfer(
            infer_request("tiny-rerank", {"query": [query], "text": documents}, raw=True)
        )
        native = await stack.stub.Rerank(
            gateway_pb2.RerankRequest(model="tiny-rerank", query=query, documents=documents)
        )
        served = outputs_of(reply)
        expected = np.zeros(len(documents), dtype=np.float32)
        for r in native.results:
            expected[r.index] = r.score
        np.testing.assert_allclose(served["scores"], expected, rtol=0, atol=1e-6)
        assert list(served["ranking"]) == [r.index for r in native.results]
        assert served["ranking"][0] == relevant
    query, documents, _ = tiny_models.rerank_examples(seed=8, n=1)[0]
    top = await stack.oip.ModelInfer(
        infer_request("tiny-rerank", {"query": [query], "text": documents}, column=True, top_n=2)
    )
    served = outputs_of(top)
    assert served["scores"].shape == (len(documents),) and served["ranking"].shape == (2,)


# ----------------------------------------------------------------------------------------------------------------------
# Streams


async def test_stream_answers_many_in_flight_by_id(stack: Stack) -> None:
    """Requests sent without waiting, answered as they finish; failures answered in place; all match by id."""
    texts = tiny_models.embedding_texts(seed=12, n=40)
    requests: dict[str, pb.ModelInferRequest] = {}
    for i in range(40):
        rid = f"r{i}"
        if i % 10 == 3:
            requests[rid] = infer_request("nope", {"text": ["a"]}, request_id=rid)
        elif i % 10 == 7:
            requests[rid] = infer_request("tiny-embed", {"text": [b"\xff"]}, request_id=rid)
        elif i % 5 == 4:
            requests[rid] = infer_request("tiny-sentiment", {"text": texts[i : i + 2]}, request_id=rid, raw=True)
        else:
            requests[rid] = infer_request("tiny-embed", {"text": texts[i : i + 1 + i % 3]}, request_id=rid, raw=True)
    runs_before = stack.pipeline._embeds.runs

    async def send() -> AsyncIterator[pb.ModelInferRequest]:
        for request in requests.values():
            yield request

    answers: dict[str, pb.ModelStreamInferResponse] = {}
    async for response in stack.oip.ModelStreamInfer(send()):
        rid = response.infer_response.id
        assert rid not in answers
        answers[rid] = response
    # In flight together: concurrent embedding requests were merged into fewer pipeline runs than requests.
    assert stack.pipeline._embeds.runs - runs_before < 24
    assert set(answers) == set(requests)
    for rid, request in requests.items():
        answer = answers[rid]
        if request.model_name == "nope":
            assert answer.error_message == f"NOT_FOUND: model 'nope' not found (request id {rid!r})"
        elif request.inputs[0].contents.bytes_contents == [b"\xff"]:
            assert answer.error_message.startswith("INVALID_ARGUMENT: input 'text': element 0 is not valid UTF-8")
        else:
            assert answer.error_message == ""
            alone = await stack.oip.ModelInfer(request)
            got, expected = outputs_of(answer.infer_response), outputs_of(alone)
            assert list(got) == list(expected)
            for name in got:
                if got[name].dtype == np.object_:
                    assert got[name].tolist() == expected[name].tolist()
                else:
                    np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6)
            assert (answer.infer_response.model_name, answer.infer_response.model_version) == (
                request.model_name,
                "1",
            )


async def test_stream_cancelled_by_the_client_stops_its_work(stack: Stack) -> None:
    async def send() -> AsyncIterator[pb.ModelInferRequest]:
        yield infer_request("tiny-embed", {"text": ["first"]}, request_id="first")
        await asyncio.sleep(3600)  # the stream stays open until the client cancels it

    def stream_tasks() -> list[asyncio.Task[Any]]:
        return [
            t
            for t in asyncio.all_tasks()
            if getattr(t.get_coro(), "__qualname__", "").startswith(
                ("interleaved", "InferenceProtocolServicer.ModelStreamInfer")
            )
        ]

    call = stack.oip.ModelStreamInfer(send())
    async for response in call:
        assert response.infer_response.id == "first"
        break
    assert stream_tasks()
    call.cancel()
    for _ in range(100):
        if not stream_tasks():
            break
        await asyncio.sleep(0.02)
    assert not stream_tasks()
    reply = await stack.oip.ModelInfer(infer_request("tiny-embed", {"text": ["after"]}))
    assert outputs_of(reply)["embedding"].shape[0] == 1


# ----------------------------------------------------------------------------------------------------------------------
# Statistics


async def test_statistics_count_what_the_protocol_served(stack: Stack) -> None:
    def stats(reply: pb.ModelStatisticsResponse) -> pb.ModelStatistics:
        (only,) = reply.model_stats
        return only

    before = stats(await stack.oip.ModelStatistics(pb.ModelStatisticsRequest(name="tiny-topics")))
    start_ms = time.time_ns() // 1_000_000
    for n in (2, 3, 4):
        await stack.oip.ModelInfer(infer_request("tiny-topics", {"text": ["football match"] * n}))
    with pytest.raises(grpc.aio.AioRpcError):
        await stack.oip.ModelInfer(infer_request("tiny-topics", {"text": ["pizza " * 100]}, truncate=False))
    with pytest.raises(grpc.aio.AioRpcError):  # refused before the pipeline: not counted
        await stack.oip.ModelInfer(infer_request("tiny-topics", {"text": [b"\xff"]}))
    await stack.stub.Classify(gateway_pb2.ClassifyRequest(model="tiny-topics", inputs=["x"]))  # not counted
    end_ms = time.time_ns() // 1_000_000
    after = stats(await stack.oip.ModelStatistics(pb.ModelStatisticsRequest(name="tiny-topics", version="1")))
    assert (after.name, after.version) == ("tiny-topics", "1")
    assert after.inference_count - before.inference_count == 9
    assert after.execution_count - before.execution_count == 3
    s, f = after.inference_stats.success, after.inference_stats.fail
    assert s.count - before.inference_stats.success.count == 3 and s.ns > before.inference_stats.success.ns
    assert f.count - before.inference_stats.fail.count == 1 and f.ns > before.inference_stats.fail.ns
    assert start_ms <= after.last_inference <= end_ms

    every = await stack.oip.ModelStatistics(pb.ModelStatisticsRequest())
    assert {(m.name, m.version) for m in every.model_stats} >= {
        ("tiny-embed", "1"),
        ("tiny-ner", "1"),
        ("tiny-topics", "1"),
    }
    assert next(m for m in every.model_stats if m.name == "tiny-topics") == after


# ----------------------------------------------------------------------------------------------------------------------
# Stages down (last: it restarts a stage)


async def test_ready_follows_the_stages(stack: Stack) -> None:
    address = stack.stages["postprocess"].address
    await stack.stages["postprocess"].stop(0)
    try:
        assert not (await stack.oip.ServerReady(pb.ServerReadyRequest())).ready
        assert (await stack.oip.ServerLive(pb.ServerLiveRequest())).live
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.oip.ModelInfer(infer_request("tiny-embed", {"text": ["good"]}), timeout=20)
        d = details_of(caught.value)
        assert (d.code, d.reason) == (grpc.StatusCode.UNAVAILABLE, "STAGE_UNAVAILABLE")
    finally:
        postprocess = Postprocessor(ModelRepository(stack.repository))
        stack.stages["postprocess"] = await start_server(address, [postprocess_registrar(postprocess)])
    for _ in range(100):
        if (await stack.oip.ServerReady(pb.ServerReadyRequest())).ready:
            break
        await asyncio.sleep(0.05)
    assert (await stack.oip.ServerReady(pb.ServerReadyRequest())).ready
