"""Text generation through the Open Inference Protocol (Triton's LLM conventions: `text_input` in, `text_output` out,
`stream` for one response per text delta ending with `triton_final_response`), on an in-process stack serving the
tiny trained GPT-2 (tests/fixtures/tiny_causal.py): the real tritonclient's streaming API and ModelInfer give the
native Generate's text, settings come from inputs, parameters or `sampling_parameters`, malformed requests are named,
and a caller that goes away cancels its generations.

tritonclient cannot be imported beside Tandem's tandem/oip/v2 stubs (both are proto package `inference`), so its half
runs in a child process, `python -m tests.service.test_oip_generate SCENARIO ADDRESS ARGS`, as in
test_oip_tritonclient.py. Nothing at module level may import the server side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from tests import ROOT

if TYPE_CHECKING:
    from tandem.gateway.v1 import gateway_pb2
    from tandem.oip.v2 import grpc_service_pb2 as pb
    from tests.harness import Stack

GPT2 = "tiny-gpt2"
MAX_TOKENS = 64

# ----------------------------------------------------------------------------------------------------------------------
# The client half: runs in the child process, with tritonclient.


def _client_inputs(request: dict[str, Any]) -> list[Any]:
    """text_input BYTES [1] (left out when the request has no prompt), and each setting as an input of one element."""
    import tritonclient.grpc as grpcclient

    inputs = []
    if request.get("prompt") is not None:
        text = grpcclient.InferInput("text_input", [1, 1] if request.get("column") else [1], "BYTES")
        text.set_data_from_numpy(np.array([request["prompt"].encode()], dtype=np.object_).reshape(text.shape()))
        inputs.append(text)
    for name, (datatype, value) in request.get("tensors", {}).items():
        tensor = grpcclient.InferInput(name, [1], datatype)
        numpy_type = {"BOOL": np.bool_, "INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64}[datatype]
        tensor.set_data_from_numpy(np.array([value], dtype=numpy_type))
        inputs.append(tensor)
    return inputs


def _client_answer(result: Any) -> dict[str, Any]:
    response = result.get_response()
    text = result.as_numpy("text_output")
    return {
        "id": response.id,
        "shape": list(text.shape),
        "text": b"".join(text.reshape(-1)).decode(),
        "parameters": {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()},
    }


def _client_stream(address: str, requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Every request sent at once on one stream (start_stream / async_stream_infer); per request id, the responses in
    the order they came, until its final response or its error."""
    import tritonclient.grpc as grpcclient

    arrived: queue.Queue[dict[str, Any]] = queue.Queue()

    def callback(result: Any, error: Any) -> None:
        arrived.put({"error": error.message()} if error is not None else _client_answer(result))

    answers: dict[str, list[dict[str, Any]]] = {r["id"]: [] for r in requests}
    errors: dict[str, str] = {}
    with grpcclient.InferenceServerClient(address) as client:
        client.start_stream(callback=callback)
        for request in requests:
            client.async_stream_infer(
                GPT2, _client_inputs(request), request_id=request["id"], parameters=request.get("parameters")
            )
        pending = {r["id"] for r in requests}
        while pending:
            answer = arrived.get(timeout=60)
            if "error" in answer:
                found = re.search(r"\(request id '([^']*)'\)", answer["error"])
                rid = found.group(1) if found else "?"
                errors[rid] = answer["error"]
            else:
                rid = answer["id"]
                answers[rid].append(answer)
                if not answer["parameters"].get("triton_final_response", False):
                    continue
            pending.discard(rid)
        client.stop_stream()
    return {"answers": answers, "errors": errors}


def _client_infer(address: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ModelInfer (the sync client's infer), one request after the other: the answer or the error."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    answers = []
    with grpcclient.InferenceServerClient(address) as client:
        for request in requests:
            try:
                result = client.infer(GPT2, _client_inputs(request), parameters=request.get("parameters"))
                answers.append(_client_answer(result))
            except InferenceServerException as exc:
                answers.append({"status": exc.status(), "error": exc.message()})
    return answers


SCENARIOS: dict[str, Callable[..., Any]] = {"stream": _client_stream, "infer": _client_infer}


def _client_main(argv: list[str]) -> None:
    scenario, address, args = argv[0], argv[1], json.loads(argv[2])
    sys.stdout.write(json.dumps(SCENARIOS[scenario](address, **args)))


# ----------------------------------------------------------------------------------------------------------------------
# The test half: serves the stack in this process and asserts on what the client saw.


@pytest.fixture(scope="module")
def gpt2_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny_causal import make_gpt2

    root = tmp_path_factory.mktemp("oip-generate-repository")
    make_gpt2(root)
    return root


@pytest.fixture(scope="module")
async def stack(gpt2_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    from tests.harness import serve_stack

    async with serve_stack(gpt2_repository, tmp_path_factory.mktemp("home")) as running:
        yield running


async def run_client(stack: Stack, scenario: str, **args: Any) -> Any:
    """Runs one scenario of the client half in a child process; the server keeps serving on this event loop."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.service.test_oip_generate",
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


async def native(stack: Stack, prompt: str, **params: Any) -> list[gateway_pb2.GenerateResponse]:
    from tandem.gateway.v1 import gateway_pb2
    from tandem.generation.v1 import generation_pb2

    request = gateway_pb2.GenerateRequest(model=GPT2, prompt=prompt, params=generation_pb2.GenerationParams(**params))
    return [response async for response in stack.stub.Generate(request, timeout=60)]


def finish_reason(response: gateway_pb2.GenerateResponse) -> str:
    from tandem.generation.v1 import generation_pb2

    return generation_pb2.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()


def greedy(prompt: str | None, rid: str = "", stream: bool | None = None, **extra: Any) -> dict[str, Any]:
    """A client request: the prompt, greedy decoding of at most MAX_TOKENS as input tensors, and `stream`."""
    tensors: dict[str, Any] = {"max_tokens": ("INT32", MAX_TOKENS), "temperature": ("FP32", 0.0)}
    if stream is not None:
        tensors["stream"] = ("BOOL", stream)
    return {"id": rid, "prompt": prompt, "tensors": tensors, **extra}


def text_tensor(name: str, texts: Sequence[str], shape: Sequence[int] | None = None) -> Any:
    from tandem.oip.v2 import grpc_service_pb2 as pb

    return pb.ModelInferRequest.InferInputTensor(
        name=name,
        datatype="BYTES",
        shape=list(shape) if shape is not None else [len(texts)],
        contents=pb.InferTensorContents(bytes_contents=[t.encode() for t in texts]),
    )


def scalar_tensor(name: str, datatype: str, value: Any) -> Any:
    from tandem.oip.v2 import grpc_service_pb2 as pb

    field = {"BOOL": "bool_contents", "INT32": "int_contents", "FP32": "fp32_contents", "UINT64": "uint64_contents"}
    contents = pb.InferTensorContents(**{field[datatype]: [value]})
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=[1], contents=contents)


def infer_request(
    prompt: str | None, *tensors: Any, rid: str = "", **parameters: bool | int | float | str
) -> pb.ModelInferRequest:
    from tandem.oip.v2 import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=GPT2, id=rid)
    if prompt is not None:
        request.inputs.append(text_tensor("text_input", [prompt]))
    request.inputs.extend(tensors)
    for key, value in parameters.items():
        kind = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(value)]
        setattr(request.parameters[key], kind, value)
    return request


def output_text(response: pb.ModelInferResponse) -> str:
    (raw,) = response.raw_output_contents
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("text_output", "BYTES", [1])]
    length = int.from_bytes(raw[:4], "little")
    assert len(raw) == 4 + length
    return bytes(raw[4:]).decode()


def parameters_of(response: pb.ModelInferResponse) -> dict[str, Any]:
    return {k: getattr(v, v.WhichOneof("parameter_choice") or "") for k, v in response.parameters.items()}


async def test_metadata_lists_triton_llm_tensors(stack: Stack) -> None:
    from tandem.oip.v2 import grpc_service_pb2 as pb

    meta = await stack.oip.ModelMetadata(pb.ModelMetadataRequest(name=GPT2))
    assert (meta.name, list(meta.versions), meta.platform) == (GPT2, ["1"], "tandem_text_generation")
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    assert meta.inputs[0].name == "text_input" and inputs["text_input"] == ("BYTES", [1])
    assert inputs == {
        "text_input": ("BYTES", [1]),
        "max_tokens": ("INT32", [1]),
        "min_tokens": ("INT32", [1]),
        "temperature": ("FP32", [1]),
        "top_p": ("FP32", [1]),
        "top_k": ("INT32", [1]),
        "seed": ("UINT64", [1]),
        "repetition_penalty": ("FP32", [1]),
        "ignore_eos": ("BOOL", [1]),
        "stop": ("BYTES", [-1]),
        "stream": ("BOOL", [1]),
        "exclude_input_in_output": ("BOOL", [1]),
        "sampling_parameters": ("BYTES", [1]),
    }
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("text_output", "BYTES", [1])]


async def test_tritonclient_stream_gives_the_native_text(stack: Stack) -> None:
    """Streamed requests answer delta by delta, the last marked final with the finish reason and token counts; a
    request with stream false answers once; a malformed one is answered with its error and the others go on."""
    prompts = ["sun", "moon 猫", "東京 café 🐍", "rain 🌊"]  # the last ends with END: only EOS is generated
    requests = [greedy(p, f"s{i}", stream=True) for i, p in enumerate(prompts)]
    requests.append(greedy("sun", "whole", stream=False))
    requests.append(greedy(None, "no-prompt", stream=True))
    seen = await run_client(stack, "stream", requests=requests)

    assert seen["errors"] == {
        "no-prompt": "INVALID_ARGUMENT: missing input 'text_input': model 'tiny-gpt2' generates text from a prompt, "
        "text_input BYTES [1] (request id 'no-prompt')"
    }
    for i, prompt in enumerate(prompts):
        expected = await native(stack, prompt, max_new_tokens=MAX_TOKENS, temperature=0)
        answers = seen["answers"][f"s{i}"]
        assert "".join(a["text"] for a in answers) == "".join(r.text for r in expected)
        assert all(a["shape"] == [1] for a in answers)
        assert [a["parameters"]["triton_final_response"] for a in answers] == [False] * (len(answers) - 1) + [True]
        assert all(a["text"] for a in answers[:-1]), "a delta without text is not sent"
        last = answers[-1]["parameters"]
        assert (last["finish_reason"], last["prompt_tokens"], last["generated_tokens"]) == (
            finish_reason(expected[-1]),
            expected[-1].usage.prompt_tokens,
            expected[-1].usage.generated_tokens,
        )
    # How the deltas group into messages depends on how fast the caller reads: on a busy machine one answer's tokens
    # can all come with its final message (seen once in a full run under load), so not every long answer need come in
    # pieces; the three together arriving in one message each would mean no streaming at all.
    assert any(len(seen["answers"][f"s{i}"]) >= 2 for i in range(3)), "long answers arrive in several deltas"
    assert [a["text"] for a in seen["answers"]["s3"]] == [""]

    (whole,) = seen["answers"]["whole"]
    expected = await native(stack, "sun", max_new_tokens=MAX_TOKENS, temperature=0)
    assert whole["text"] == "".join(r.text for r in expected) and whole["parameters"]["triton_final_response"]
    assert whole["parameters"]["finish_reason"] == finish_reason(expected[-1]) == "stop"


async def test_tritonclient_infer_gives_the_whole_text(stack: Stack) -> None:
    """ModelInfer answers with the whole text, whatever `stream` says; settings may come as request parameters or
    as the vLLM backend's sampling_parameters JSON."""
    sampling = json.dumps({"max_tokens": 16, "temperature": 0, "stop": ["東京"]})
    requests = [
        greedy("moon 猫", stream=True),
        {"prompt": "sun", "column": True, "parameters": {"max_tokens": 6, "temperature": 0.0}},
        {"prompt": "🍎", "parameters": {"sampling_parameters": sampling}},
        {"prompt": "sun", "parameters": {"max_tokens": "6"}},
    ]
    answers = await run_client(stack, "infer", requests=requests)

    expected = await native(stack, "moon 猫", max_new_tokens=MAX_TOKENS, temperature=0)
    assert answers[0]["text"] == "".join(r.text for r in expected) and answers[0]["shape"] == [1]
    assert answers[0]["parameters"] == {
        "finish_reason": "stop",
        "prompt_tokens": expected[-1].usage.prompt_tokens,
        "generated_tokens": expected[-1].usage.generated_tokens,
    }
    expected = await native(stack, "sun", max_new_tokens=6, temperature=0)
    assert answers[1]["text"] == "".join(r.text for r in expected)
    assert answers[1]["parameters"]["finish_reason"] == "length"
    expected = await native(stack, "🍎", max_new_tokens=16, temperature=0, stop=["東京"])
    assert answers[2]["text"] == "".join(r.text for r in expected)
    assert answers[2]["text"].startswith(" moon") and "東京" not in answers[2]["text"]
    assert answers[2]["parameters"]["finish_reason"] == "stop_sequence"
    assert answers[2]["parameters"]["stop_sequence"] == "東京"
    assert answers[3] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "error": "parameter 'max_tokens' must be an integer in 0..2147483647, got '6'",
    }


async def test_a_setting_comes_from_the_input_then_the_parameter_then_sampling_parameters(stack: Stack) -> None:
    ignore_eos = scalar_tensor("ignore_eos", "BOOL", True)
    sampling = json.dumps({"max_tokens": 7, "ignore_eos": True, "temperature": 0})
    requests = {
        3: infer_request(
            "rain 🌊", scalar_tensor("max_tokens", "INT32", 3), max_tokens=5, sampling_parameters=sampling
        ),
        5: infer_request("rain 🌊", ignore_eos, max_tokens=5, sampling_parameters=sampling),
        7: infer_request("rain 🌊", sampling_parameters=sampling),
    }
    for tokens, request in requests.items():
        response = await stack.oip.ModelInfer(request)
        expected = await native(stack, "rain 🌊", max_new_tokens=tokens, temperature=0, ignore_eos=True)
        assert output_text(response) == "".join(r.text for r in expected)
        assert parameters_of(response) == {
            "finish_reason": "length",
            "prompt_tokens": expected[-1].usage.prompt_tokens,
            "generated_tokens": tokens,
        }
    seeded = infer_request(
        "sun",
        scalar_tensor("seed", "UINT64", 2**64 - 1),
        scalar_tensor("temperature", "FP32", 1.5),
        scalar_tensor("top_k", "INT32", 5),
        scalar_tensor("top_p", "FP32", 0.9),
        scalar_tensor("min_tokens", "INT32", 2),
        scalar_tensor("repetition_penalty", "FP32", 1.1),
        scalar_tensor("exclude_input_in_output", "BOOL", True),
        text_tensor("stop", ["🐍", "rain"], [2]),
    )
    first, second = [output_text(await stack.oip.ModelInfer(seeded)) for _ in range(2)]
    assert first == second, "the same seed and settings give the same text"
    expected = await native(
        stack,
        "sun",
        seed=2**64 - 1,
        temperature=1.5,
        top_k=5,
        top_p=0.9,
        min_new_tokens=2,
        repetition_penalty=1.1,
        stop=["🐍", "rain"],
    )
    assert first == "".join(r.text for r in expected)


# Requests refused before the pipeline runs: the code, the field the BadRequest names, a part of the message.
def _error_cases() -> list[tuple[str, Any, str, str]]:
    return [
        (
            "no text_input",
            infer_request(None, scalar_tensor("max_tokens", "INT32", 4)),
            "inputs[text_input]",
            "missing input 'text_input': model 'tiny-gpt2' generates text from a prompt",
        ),
        (
            "two prompts",
            infer_request(None, text_tensor("text_input", ["sun", "moon"])),
            "inputs[text_input]",
            "input 'text_input' must have shape [1] or [1, 1], got [2]",
        ),
        ("empty prompt", infer_request(""), "inputs[text_input]", "input 'text_input' must not be empty"),
        (
            "unknown input",
            infer_request("sun", text_tensor("text", ["sun"])),
            "inputs[text]",
            "unexpected input 'text': model 'tiny-gpt2' takes 'text_input', 'max_tokens'",
        ),
        (
            "max_tokens FP32",
            infer_request("sun", scalar_tensor("max_tokens", "FP32", 4.0)),
            "inputs[max_tokens]",
            "input 'max_tokens' must be one element of INT8..INT64 or UINT8..UINT64, an integer in 0..2147483647; "
            "got FP32 [1]",
        ),
        (
            "stream INT32",
            infer_request("sun", scalar_tensor("stream", "INT32", 1)),
            "inputs[stream]",
            "input 'stream' must be one element of BOOL, a bool; got INT32 [1]",
        ),
        (
            "negative top_k",
            infer_request("sun", scalar_tensor("top_k", "INT32", -1)),
            "inputs[top_k]",
            "input 'top_k' must be one element of INT8..INT64 or UINT8..UINT64, an integer in 0..2147483647",
        ),
        (
            "temperature parameter bool",
            infer_request("sun", temperature=True),
            "parameters[temperature]",
            "parameter 'temperature' must be a finite number, got True",
        ),
        (
            "stop parameter int",
            infer_request("sun", stop=3),
            "parameters[stop]",
            "parameter 'stop' must be a string",
        ),
        (
            "sampling_parameters not JSON",
            infer_request("sun", sampling_parameters="{max_tokens: 3}"),
            "parameters[sampling_parameters]",
            "sampling_parameters is not valid JSON",
        ),
        (
            "sampling_parameters unknown key",
            infer_request("sun", sampling_parameters='{"n": 2}'),
            "parameters[sampling_parameters]",
            "sampling_parameters: unknown key 'n'; Tandem takes max_tokens, min_tokens, temperature",
        ),
        (
            "sampling_parameters bad value",
            infer_request("sun", sampling_parameters='{"max_tokens": 1.5}'),
            "parameters[sampling_parameters]",
            "sampling_parameters: 'max_tokens' must be an integer in 0..2147483647, got 1.5",
        ),
        (
            "sampling_parameters not a string",
            infer_request("sun", sampling_parameters=3),
            "parameters[sampling_parameters]",
            "parameter 'sampling_parameters' must be a string holding a JSON object",
        ),
    ]


async def test_malformed_requests_are_named(stack: Stack) -> None:
    import grpc

    from tests.status import details_of

    for case, request, field, message in _error_cases():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.oip.ModelInfer(request)
        details = details_of(caught.value)
        assert (details.code, details.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field]), case
        assert message in details.message, case


async def test_pipeline_errors_pass_through_unchanged(stack: Stack) -> None:
    import grpc

    from tests.status import details_of

    with pytest.raises(grpc.aio.AioRpcError) as native_error:
        await native(stack, "sun", max_new_tokens=0)
    with pytest.raises(grpc.aio.AioRpcError) as oip_error:
        await stack.oip.ModelInfer(infer_request("sun", scalar_tensor("max_tokens", "INT32", 0)))
    ours, theirs = details_of(oip_error.value), details_of(native_error.value)
    assert (ours.code, ours.message, ours.reason, ours.fields) == (
        theirs.code,
        theirs.message,
        theirs.reason,
        theirs.fields,
    )
    assert ours.code == grpc.StatusCode.INVALID_ARGUMENT and ours.fields == ["params.max_new_tokens"]


async def test_closing_the_stream_cancels_the_generation(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's generation is held after its first message, so only cancellation can end it: the caller
    cancelling the stream must close it, and the inference stage then drops the sequence."""
    from tandem.oip.v2 import grpc_service_pb2 as pb

    generate = stack.pipeline.generate
    closed = asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        try:
            async with contextlib.aclosing(generate(*args, **kwargs)) as messages:
                async for message in messages:
                    yield message
                    if message.text:  # the first message the caller sees
                        break
                await asyncio.Event().wait()
        finally:
            closed.set()

    monkeypatch.setattr(stack.pipeline, "generate", held)
    opened = asyncio.Event()

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        yield infer_request("sun", scalar_tensor("stream", "BOOL", True), max_tokens=200, ignore_eos=True)
        opened.set()
        await asyncio.Event().wait()  # the caller keeps its side of the stream open

    call = stack.oip.ModelStreamInfer(requests())
    first = await asyncio.wait_for(call.read(), timeout=60)
    assert isinstance(first, pb.ModelStreamInferResponse)
    assert not first.error_message and parameters_of(first.infer_response) == {"triton_final_response": False}
    assert not closed.is_set()
    call.cancel()
    await asyncio.wait_for(closed.wait(), timeout=30)

    def sequences() -> int:
        return sum(s.engine.in_flight for s in stack.core.registry.slots.values() if s.engine is not None)

    for _ in range(300):
        if sequences() == 0:
            break
        await asyncio.sleep(0.1)
    assert sequences() == 0


async def test_interleaved_hands_over_one_answer_at_a_time_and_closes_on_exit() -> None:
    """The stream fan-out: answers of several requests interleave; a request produces its next answer only once the
    previous one was taken; leaving the stream closes every request's answers."""
    from gateway.streams import interleaved

    produced: dict[str, int] = {"a": 0, "b": 0}
    closed: list[str] = []

    async def answers(item: str) -> AsyncGenerator[str, None]:
        try:
            for i in range(100):
                produced[item] += 1
                yield f"{item}{i}"
        finally:
            closed.append(item)

    async def items() -> AsyncIterator[str]:
        yield "a"
        yield "b"
        await asyncio.Event().wait()

    stream = interleaved(items(), answers, 8)
    taken = [await anext(stream) for _ in range(6)]
    for _ in range(20):
        await asyncio.sleep(0)
    assert taken == ["a0", "b0", "a1", "b1", "a2", "b2"]
    # a2 counts as taken once b2 was asked for, b2 only once the next answer is: each request has produced one more.
    assert produced == {"a": 4, "b": 3}
    await stream.aclose()
    assert sorted(closed) == ["a", "b"]


if __name__ == "__main__":
    _client_main(sys.argv[1:])
