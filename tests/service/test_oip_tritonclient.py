"""The Open Inference Protocol on the gateway through the real tritonclient package, sync and asyncio clients.

tritonclient ships its own generated `inference` messages, and protobuf allows each message name only once per
process, so tritonclient cannot be imported beside Tandem's tandem/oip/v2/grpc_service_pb2 (proto package `inference`
too), which the gateway uses. The client half of each test therefore runs in a child process,
`python -m tests.service.test_oip_tritonclient SCENARIO ADDRESS ARGS`, against the stack this test process serves
(in-process stages and gateway on the tiny models), and prints what the client saw as JSON; the assertions run here.
Nothing at module level may import the server side.
"""

from __future__ import annotations

import asyncio
import base64
import json
import queue
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from tests import ROOT

if TYPE_CHECKING:
    from tests.harness import Stack

MODELS = ["tiny-embed", "tiny-embed-cls", "tiny-ner", "tiny-rerank", "tiny-sentiment", "tiny-topics"]


# ----------------------------------------------------------------------------------------------------------------------
# The client half: runs in the child process, with tritonclient.


def _inputs(request: dict[str, Any]) -> list[Any]:
    """InferInput objects filled with set_data_from_numpy: BYTES from a numpy object array (sent raw)."""
    import tritonclient.grpc as grpcclient

    inputs = []
    texts, query, datatype = request["texts"], request.get("query"), request.get("datatype", "BYTES")
    if query is not None:
        q = grpcclient.InferInput("query", [1], "BYTES")
        q.set_data_from_numpy(np.array([query], dtype=np.object_))
        inputs.append(q)
    shape = request.get("shape") or ([len(texts), 1] if request.get("column") else [len(texts)])
    text = grpcclient.InferInput("text", shape, datatype)
    if datatype == "BYTES":
        elements = [t.encode("utf-8", "surrogateescape") for t in texts]  # a lone surrogate makes invalid UTF-8
        text.set_data_from_numpy(np.array(elements, dtype=np.object_).reshape(shape))
    else:
        text.set_data_from_numpy(np.ones(shape, dtype=np.float32))
    inputs.append(text)
    return inputs


def _outputs(names: list[str] | None, class_count: int = 0) -> list[Any] | None:
    import tritonclient.grpc as grpcclient

    return [grpcclient.InferRequestedOutput(n, class_count=class_count) for n in names] if names else None


def _result(result: Any) -> dict[str, Any]:
    response = result.get_response()
    outputs = {}
    for tensor in response.outputs:
        array = result.as_numpy(tensor.name)
        flat = array.reshape(-1)
        data = [x.decode() for x in flat] if tensor.datatype == "BYTES" else flat.tolist()
        outputs[tensor.name] = {"datatype": tensor.datatype, "shape": list(array.shape), "data": data}
    return {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "outputs": outputs,
    }


def _error(exc: Any) -> dict[str, Any]:
    return {"status": exc.status(), "message": exc.message()}


def _infer_args(request: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_name": request["model"],
        "inputs": _inputs(request),
        "model_version": request.get("version", ""),
        "outputs": _outputs(request.get("outputs"), request.get("class_count", 0)),
        "request_id": request.get("id", ""),
        "parameters": request.get("parameters"),
    }


def _client_probe(address: str, client: str) -> dict[str, Any]:
    """Health, metadata, repository and statistics calls, as a client that just connected would make them."""
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient
    from tritonclient.utils import InferenceServerException

    async def calls(c: Any, wait: Callable[[Any], Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "live": await wait(c.is_server_live()),
            "ready": await wait(c.is_server_ready()),
            "model_ready": {m: await wait(c.is_model_ready(m)) for m in ("tiny-embed", "nope")},
            "server": await wait(c.get_server_metadata(as_json=True)),
            "metadata": {m: await wait(c.get_model_metadata(m, as_json=True)) for m in MODELS},
            "index": await wait(c.get_model_repository_index(as_json=True)),
            "statistics": await wait(c.get_inference_statistics("tiny-embed", as_json=True)),
        }
        await wait(c.load_model("tiny-embed"))
        out["loaded"] = True
        await wait(c.unload_model("tiny-topics"))
        out["after unload"] = {
            "ready": await wait(c.is_model_ready("tiny-topics")),
            "index": await wait(c.get_model_repository_index(as_json=True)),
        }
        await wait(c.load_model("tiny-topics"))
        out["after load"] = await wait(c.is_model_ready("tiny-topics"))
        failing: dict[str, Callable[[], Any]] = {
            "load unknown": lambda: c.load_model("nope"),
            "load with config": lambda: c.load_model("tiny-embed", config="{}"),
            "unload unknown": lambda: c.unload_model("nope"),
            "metadata of unknown": lambda: c.get_model_metadata("nope"),
        }
        for name, call in failing.items():
            try:
                await wait(call())
                out[name] = None
            except InferenceServerException as exc:
                out[name] = _error(exc)
        return out

    async def done(value: Any) -> Any:
        return await value if asyncio.iscoroutine(value) else value

    async def run() -> dict[str, Any]:
        if client == "sync":
            with grpcclient.InferenceServerClient(address) as c:
                return await calls(c, done)
        c = aioclient.InferenceServerClient(address)
        try:
            return await calls(c, done)
        finally:
            await c.close()

    return asyncio.run(run())


def _client_infer(address: str, client: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ModelInfer, one call after the other; each answer is the result or the error."""
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient
    from tritonclient.utils import InferenceServerException

    answers = []
    if client == "sync":
        with grpcclient.InferenceServerClient(address) as c:
            for request in requests:
                try:
                    answers.append({"result": _result(c.infer(**_infer_args(request)))})
                except InferenceServerException as exc:
                    answers.append({"error": _error(exc)})
        return answers

    async def run() -> None:
        c = aioclient.InferenceServerClient(address)
        try:
            for request in requests:
                try:
                    answers.append({"result": _result(await c.infer(**_infer_args(request)))})
                except InferenceServerException as exc:
                    answers.append({"error": _error(exc)})
        finally:
            await c.close()

    asyncio.run(run())
    return answers


def _client_stream(address: str, client: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ModelStreamInfer: every request sent at once, answers collected in the order they arrive."""
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient

    def answer(result: Any, error: Any) -> dict[str, Any]:
        return {"error": error.message()} if error is not None else {"result": _result(result)}

    if client == "sync":
        arrived: queue.Queue[dict[str, Any]] = queue.Queue()
        with grpcclient.InferenceServerClient(address) as c:
            c.start_stream(callback=lambda result, error: arrived.put(answer(result, error)))
            for request in requests:
                args = _infer_args(request)
                c.async_stream_infer(args.pop("model_name"), args.pop("inputs"), **args)
            answers = [arrived.get(timeout=60) for _ in requests]
            c.stop_stream()
        return answers

    async def run() -> list[dict[str, Any]]:
        async def send() -> AsyncIterator[dict[str, Any]]:
            for request in requests:
                yield _infer_args(request)

        c = aioclient.InferenceServerClient(address)
        try:
            got = []
            async for result, error in c.stream_infer(send()):
                got.append(answer(result, error))
                if len(got) == len(requests):
                    break
            return got
        finally:
            await c.close()

    return asyncio.run(run())


def _client_descriptor(address: str) -> str:
    """tritonclient's own compiled grpc_service.proto, to compare with Tandem's."""
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import service_pb2

    proto = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(proto)
    return base64.b64encode(proto.SerializeToString()).decode()


SCENARIOS: dict[str, Callable[..., Any]] = {
    "probe": _client_probe,
    "infer": _client_infer,
    "stream": _client_stream,
    "descriptor": _client_descriptor,
}


def _client_main(argv: list[str]) -> None:
    scenario, address, args = argv[0], argv[1], json.loads(argv[2])
    sys.stdout.write(json.dumps(SCENARIOS[scenario](address, **args)))


# ----------------------------------------------------------------------------------------------------------------------
# The test half: serves the stack in this process and asserts on what the client saw.


@pytest.fixture(scope="module")
async def stack(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    from tests.service.test_oip import serve_oip_stack  # the server side, never imported by the client process

    async with serve_oip_stack(served_repository, tmp_path_factory.mktemp("home")) as running:
        yield running


async def run_client(stack: Stack, scenario: str, **args: Any) -> Any:
    """Runs one scenario of the client half in a child process; the server keeps serving on this event loop."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.service.test_oip_tritonclient",
        scenario,
        stack.gateway.address,
        json.dumps(args),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), timeout=120)
    assert child.returncode == 0, err.decode()
    return json.loads(out)


async def native_embeddings(stack: Stack, model: str, texts: list[str], normalize: bool = True) -> np.ndarray:
    from tandem.gateway.v1 import gateway_pb2

    reply = await stack.stub.Embed(gateway_pb2.EmbedRequest(model=model, inputs=texts, normalize=normalize))
    return np.array([e.values for e in reply.embeddings], dtype=np.float32)


def tensor(result: dict[str, Any], name: str) -> np.ndarray:
    output = result["outputs"][name]
    if output["datatype"] == "BYTES":
        return np.array(output["data"], dtype=np.object_).reshape(output["shape"])
    return np.array(output["data"], dtype={"FP32": np.float32, "INT64": np.int64}[output["datatype"]]).reshape(
        output["shape"]
    )


@pytest.mark.parametrize("client", ["sync", "aio"])
async def test_probe_calls(stack: Stack, client: str) -> None:
    seen = await run_client(stack, "probe", client=client)
    assert seen["live"] is True and seen["ready"] is True
    assert seen["model_ready"] == {"tiny-embed": True, "nope": False}
    assert seen["server"]["name"] == "tandem" and seen["server"]["extensions"] == ["parameters", "statistics"]
    embed = seen["metadata"]["tiny-embed"]
    assert embed["platform"] == "tandem_embedding" and embed["versions"] == ["1"]
    assert embed["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
    assert embed["outputs"][0]["name"] == "embedding" and embed["outputs"][0]["shape"][0] == "-1"
    rerank = seen["metadata"]["tiny-rerank"]
    assert [(t["name"], t["shape"]) for t in rerank["inputs"]] == [("query", ["1"]), ("text", ["-1"])]
    assert [(t["name"], t["datatype"]) for t in rerank["outputs"]] == [("scores", "FP32"), ("ranking", "INT64")]
    assert [(m["name"], m["version"], m["state"]) for m in seen["index"]["models"]] == [
        (m, "1", "READY") for m in MODELS
    ]
    assert [(s["name"], s["version"]) for s in seen["statistics"]["model_stats"]] == [("tiny-embed", "1")]
    assert seen["loaded"] is True
    assert seen["load unknown"]["status"] == "StatusCode.NOT_FOUND"
    assert "model 'nope' not found" in seen["load unknown"]["message"]
    assert seen["load with config"]["status"] == "StatusCode.UNIMPLEMENTED"
    assert seen["unload unknown"]["status"] == "StatusCode.NOT_FOUND"
    assert seen["after unload"]["ready"] is False
    unloaded = [m for m in seen["after unload"]["index"]["models"] if m["name"] == "tiny-topics"]
    assert [(m["version"], m["state"]) for m in unloaded] == [("1", "UNAVAILABLE")]
    assert seen["after load"] is True
    assert seen["metadata of unknown"]["status"] == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("client", ["sync", "aio"])
async def test_infer_equals_native(stack: Stack, client: str) -> None:
    from tandem.gateway.v1 import gateway_pb2
    from tests.fixtures import tiny_models

    texts = [*tiny_models.embedding_texts(seed=21, n=6), "naïve café ☕"]
    sentiment = [t for t, _ in tiny_models.classifier_examples(seed=22, n=5)]
    ner = [t for t, _ in tiny_models.ner_examples(seed=23, n=5)]
    query, documents, relevant = tiny_models.rerank_examples(seed=24, n=1)[0]
    requests = [
        {"model": "tiny-embed", "texts": texts, "id": "a"},
        {"model": "tiny-embed", "texts": texts, "column": True, "parameters": {"normalize": False}},
        {"model": "tiny-sentiment", "texts": sentiment, "version": "1"},
        {"model": "tiny-sentiment", "texts": sentiment, "outputs": ["labels"], "parameters": {"top_k": 1}},
        {"model": "tiny-ner", "texts": ner},
        {"model": "tiny-rerank", "texts": documents, "query": query, "parameters": {"top_n": 2}},
    ]
    answers = await run_client(stack, "infer", client=client, requests=requests)
    results = [a["result"] for a in answers]

    normalized, raw = results[0], results[1]
    assert (normalized["model_name"], normalized["model_version"], normalized["id"]) == ("tiny-embed", "1", "a")
    for result, normalize in ((normalized, True), (raw, False)):
        expected = await native_embeddings(stack, "tiny-embed", texts, normalize)
        np.testing.assert_allclose(tensor(result, "embedding"), expected, rtol=0, atol=1e-6)

    classified = await stack.stub.Classify(gateway_pb2.ClassifyRequest(model="tiny-sentiment", inputs=sentiment))
    labels, scores = tensor(results[2], "labels"), tensor(results[2], "scores")
    assert labels.tolist() == [[s.label for s in r.labels] for r in classified.results]
    np.testing.assert_allclose(scores, [[s.score for s in r.labels] for r in classified.results], rtol=0, atol=1e-6)
    assert list(results[3]["outputs"]) == ["labels"]
    assert tensor(results[3], "labels").tolist() == [[r.labels[0].label] for r in classified.results]

    tagged = await stack.stub.ClassifyTokens(gateway_pb2.ClassifyTokensRequest(model="tiny-ner", inputs=ner))
    entities = [json.loads(x) for x in tensor(results[4], "entities")]
    assert [[(e["label"], e["start"], e["end"], e["text"]) for e in row] for row in entities] == [
        [(e.label, e.start, e.end, e.text) for e in r.entities] for r in tagged.results
    ]

    ranked = await stack.stub.Rerank(gateway_pb2.RerankRequest(model="tiny-rerank", query=query, documents=documents))
    expected_scores = np.zeros(len(documents), dtype=np.float32)
    for r in ranked.results:
        expected_scores[r.index] = r.score
    np.testing.assert_allclose(tensor(results[5], "scores"), expected_scores, rtol=0, atol=1e-6)
    assert tensor(results[5], "ranking").tolist() == [r.index for r in ranked.results][:2]
    assert tensor(results[5], "ranking")[0] == relevant


# Requests whose answer is an error, with the gRPC status and a part of the message tritonclient reports.
ERROR_CASES: list[tuple[dict[str, Any], str, str]] = [
    ({"model": "nope", "texts": ["a"]}, "StatusCode.NOT_FOUND", "model 'nope' not found"),
    ({"model": "tiny-embed", "version": "9", "texts": ["a"]}, "StatusCode.NOT_FOUND", "no version 9"),
    (
        {"model": "tiny-embed", "texts": ["a", "b"], "datatype": "FP32"},
        "StatusCode.INVALID_ARGUMENT",
        "input 'text' must be BYTES (UTF-8 texts), got FP32",
    ),
    ({"model": "tiny-rerank", "texts": ["a"]}, "StatusCode.INVALID_ARGUMENT", "missing input 'query'"),
    (
        {"model": "tiny-embed", "texts": ["a", "b"], "shape": [1, 2]},
        "StatusCode.INVALID_ARGUMENT",
        "input 'text' must have shape [n] or [n, 1], got [1, 2]",
    ),
    ({"model": "tiny-embed", "texts": ["caf\udce9"]}, "StatusCode.INVALID_ARGUMENT", "element 0 is not valid UTF-8"),
    (
        {"model": "tiny-embed", "texts": ["a"], "outputs": ["nope"]},
        "StatusCode.INVALID_ARGUMENT",
        "unknown output 'nope'",
    ),
    (
        {"model": "tiny-sentiment", "texts": ["a"], "outputs": ["scores"], "class_count": 2},
        "StatusCode.INVALID_ARGUMENT",
        "classification extension is not supported",
    ),
    (
        {"model": "tiny-sentiment", "texts": ["a"], "parameters": {"top_k": "two"}},
        "StatusCode.INVALID_ARGUMENT",
        "parameter 'top_k' must be an integer",
    ),
]


@pytest.mark.parametrize("client", ["sync", "aio"])
async def test_infer_errors(stack: Stack, client: str) -> None:
    answers = await run_client(stack, "infer", client=client, requests=[r for r, _, _ in ERROR_CASES])
    for answer, (_, status, message) in zip(answers, ERROR_CASES, strict=True):
        assert answer["error"]["status"] == status
        assert message in answer["error"]["message"]


@pytest.mark.parametrize("client", ["sync", "aio"])
async def test_stream_many_in_flight_matched_by_id(stack: Stack, client: str) -> None:
    from tests.fixtures import tiny_models

    texts = tiny_models.embedding_texts(seed=31, n=40)
    requests: list[dict[str, Any]] = []
    for i in range(30):
        request: dict[str, Any] = {"model": "tiny-embed", "texts": texts[i : i + 1 + i % 3], "id": f"r{i}"}
        if i % 7 == 3:
            request["model"] = "nope"
        elif i % 7 == 5:
            request["datatype"] = "FP32"
        requests.append(request)
    answers = await run_client(stack, "stream", client=client, requests=requests)
    assert len(answers) == len(requests)
    by_id = {a["result"]["id"]: a["result"] for a in answers if "result" in a}
    failures = sorted(a["error"] for a in answers if "error" in a)
    for request in requests:
        rid = request["id"]
        if request["model"] == "nope":
            assert f"NOT_FOUND: model 'nope' not found (request id {rid!r})" in failures
        elif request.get("datatype") == "FP32":
            assert any(
                f.startswith("INVALID_ARGUMENT: input 'text' must be BYTES") and f"{rid!r}" in f for f in failures
            )
        else:
            result = by_id[rid]
            expected = await native_embeddings(stack, "tiny-embed", request["texts"])
            np.testing.assert_allclose(tensor(result, "embedding"), expected, rtol=0, atol=1e-6)
            assert (result["model_name"], result["model_version"]) == ("tiny-embed", "1")
    assert len(failures) == sum(1 for i in range(30) if i % 7 in (3, 5))


async def test_statistics_through_tritonclient(stack: Stack) -> None:
    before = (await run_client(stack, "probe", client="sync"))["statistics"]["model_stats"][0]
    requests: list[dict[str, Any]] = [{"model": "tiny-embed", "texts": ["a"] * n} for n in (1, 2, 3)]
    requests.append({"model": "tiny-embed", "texts": ["good " * 100], "parameters": {"truncate": False}})
    answers = await run_client(stack, "infer", client="aio", requests=requests)
    assert [("result" in a) for a in answers] == [True, True, True, False]
    after = (await run_client(stack, "probe", client="sync"))["statistics"]["model_stats"][0]

    def number(stats: dict[str, Any], *path: str) -> int:
        value: Any = stats
        for key in path:
            value = value.get(key, {})
        return int(value or 0)

    assert number(after, "inference_count") - number(before, "inference_count") == 6
    assert number(after, "execution_count") - number(before, "execution_count") == 3
    success = number(after, "inference_stats", "success", "count") - number(
        before, "inference_stats", "success", "count"
    )
    fail = number(after, "inference_stats", "fail", "count") - number(before, "inference_stats", "fail", "count")
    assert (success, fail) == (3, 1)
    assert number(after, "last_inference") >= max(number(before, "last_inference"), 1)


async def test_wire_contract_matches_tritonclient() -> None:
    """Every message and RPC Tandem declares is, byte for byte, the one tritonclient was compiled with."""
    from google.protobuf import descriptor_pb2

    from tandem.oip.v2 import grpc_service_pb2

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.service.test_oip_tritonclient",
        "descriptor",
        "-",
        "{}",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await child.communicate()
    theirs = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(json.loads(out)))
    ours = descriptor_pb2.FileDescriptorProto()
    grpc_service_pb2.DESCRIPTOR.CopyToProto(ours)
    assert (
        (ours.package, ours.service[0].name)
        == (theirs.package, theirs.service[0].name)
        == (
            "inference",
            "GRPCInferenceService",
        )
    )
    their_messages = {m.name: m for m in theirs.message_type}
    for message in ours.message_type:
        assert message == their_messages[message.name], message.name
    their_methods = {m.name: m for m in theirs.service[0].method}
    for method in ours.service[0].method:
        assert method == their_methods[method.name], method.name
    assert len(ours.service[0].method) == 11


if __name__ == "__main__":
    _client_main(sys.argv[1:])
