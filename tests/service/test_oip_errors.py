"""The Open Inference Protocol's errors on the gateway, through its generated stub: every malformed or unservable
inference request, and every other RPC's refusals, answered with their code, ErrorInfo reason and BadRequest fields."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from tandem.oip.v2 import grpc_service_pb2 as pb
from tests.harness import Stack
from tests.service.test_oip import MAX_INPUTS, infer_request, raw_bytes, serve_oip_stack, text_input
from tests.status import details_of


@pytest.fixture(scope="module")
async def stack(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with serve_oip_stack(served_repository, tmp_path_factory.mktemp("home")) as running:
        yield running


def _raw_request(model: str, name: str, raw: bytes, shape: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.append(pb.ModelInferRequest.InferInputTensor(name=name, datatype="BYTES", shape=shape))
    request.raw_input_contents.append(raw)
    return request


def _fp32_text() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny-embed")
    request.inputs.append(
        pb.ModelInferRequest.InferInputTensor(
            name="text", datatype="FP32", shape=[2], contents=pb.InferTensorContents(fp32_contents=[1, 2])
        )
    )
    return request


def _both_forms() -> pb.ModelInferRequest:
    request = infer_request("tiny-embed", {"text": ["a"]})
    request.raw_input_contents.append(raw_bytes([b"a"]))
    return request


def _classification_extension() -> pb.ModelInferRequest:
    request = infer_request("tiny-sentiment", {"text": ["a"]})
    request.outputs.add(name="scores").parameters["classification"].int64_param = 2
    return request


def _sequence() -> pb.ModelInferRequest:
    request = infer_request("tiny-embed", {"text": ["a"]})
    request.parameters["sequence_id"].int64_param = 7
    return request


INFER_ERRORS: dict[str, Callable[[], pb.ModelInferRequest]] = {
    "unknown model": lambda: infer_request("nope", {"text": ["a"]}),
    "unknown version": lambda: infer_request("tiny-embed", {"text": ["a"]}, version="9"),
    "version not a number": lambda: infer_request("tiny-embed", {"text": ["a"]}, version="v1"),
    "no model name": lambda: infer_request("", {"text": ["a"]}),
    "colon in model name": lambda: infer_request("tiny-embed:1", {"text": ["a"]}),
    "wrong datatype": _fp32_text,
    "missing input": lambda: infer_request("tiny-rerank", {"text": ["a", "b"]}),
    "unexpected input": lambda: infer_request("tiny-embed", {"text": ["a"], "extra": ["b"]}),
    "input given twice": lambda: pb.ModelInferRequest(
        model_name="tiny-embed", inputs=[text_input("text", ["a"]), text_input("text", ["b"])]
    ),
    "wrong shape": lambda: pb.ModelInferRequest(
        model_name="tiny-embed", inputs=[text_input("text", ["a", "b", "c", "d"], [2, 2])]
    ),
    "query of two": lambda: infer_request("tiny-rerank", {"query": ["a", "b"], "text": ["c"]}),
    "negative dimension": lambda: pb.ModelInferRequest(model_name="tiny-embed", inputs=[text_input("text", [], [-1])]),
    "elements do not fill shape": lambda: pb.ModelInferRequest(
        model_name="tiny-embed", inputs=[text_input("text", ["a", "b"], [3])]
    ),
    "no texts": lambda: infer_request("tiny-embed", {"text": []}),
    "too many texts": lambda: infer_request("tiny-embed", {"text": ["a"] * (MAX_INPUTS + 1)}),
    "invalid utf-8": lambda: infer_request("tiny-embed", {"text": ["fine", b"caf\xe9"]}),
    "invalid utf-8 raw": lambda: infer_request("tiny-embed", {"text": [b"\xff\xfe"]}, raw=True),
    "raw cut inside a length": lambda: _raw_request("tiny-embed", "text", raw_bytes([b"ab"]) + b"\x01\x00", [2]),
    "raw cut inside an element": lambda: _raw_request("tiny-embed", "text", struct.pack("<I", 10) + b"abc", [1]),
    "raw holds more elements": lambda: _raw_request("tiny-embed", "text", raw_bytes([b"a", b"b"]), [1]),
    "raw holds fewer elements": lambda: _raw_request("tiny-embed", "text", raw_bytes([b"a"]), [3]),
    "raw count": lambda: pb.ModelInferRequest(
        model_name="tiny-embed",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])],
        raw_input_contents=[raw_bytes([b"a"]), raw_bytes([b"b"])],
    ),
    "raw and contents": _both_forms,
    "normalize not a bool": lambda: infer_request("tiny-embed", {"text": ["a"]}, normalize=1),
    "top_k not an int": lambda: infer_request("tiny-sentiment", {"text": ["a"]}, top_k="two"),
    "negative top_n": lambda: infer_request("tiny-rerank", {"query": ["q"], "text": ["a"]}, top_n=-1),
    "unknown output": lambda: infer_request("tiny-embed", {"text": ["a"]}, outputs=["scores"]),
    "classification extension": _classification_extension,
    "sequence": _sequence,
    "too long": lambda: infer_request("tiny-embed", {"text": ["good", "good " * 100]}, truncate=False),
}


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
# fmt: off
INFER_ERROR_CASES = [
    ("unknown model", NOT_FOUND, "MODEL_NOT_FOUND", [], "model 'nope' not found"),
    ("unknown version", NOT_FOUND, "MODEL_NOT_FOUND", [], "no version 9"),
    ("version not a number", INVALID, "INVALID_INPUT", ["model_version"], "must be a number"),
    ("no model name", INVALID, "INVALID_INPUT", ["model_name"], "model_name is required"),
    ("colon in model name", INVALID, "INVALID_INPUT", ["model_name"], "must not contain ':'"),
    ("wrong datatype", INVALID, "INVALID_INPUT", ["inputs[text]"], "input 'text' must be BYTES (UTF-8 texts), got FP32"),
    ("missing input", INVALID, "INVALID_INPUT", ["inputs[query]"], "missing input 'query': model 'tiny-rerank' takes 'query', 'text'"),
    ("unexpected input", INVALID, "INVALID_INPUT", ["inputs[extra]"], "unexpected input 'extra'"),
    ("input given twice", INVALID, "INVALID_INPUT", ["inputs[text]"], "given twice"),
    ("wrong shape", INVALID, "INVALID_INPUT", ["inputs[text]"], "must have shape [n] or [n, 1], got [2, 2]"),
    ("query of two", INVALID, "INVALID_INPUT", ["inputs[query]"], "must have shape [1] or [1, 1], got [2]"),
    ("negative dimension", INVALID, "INVALID_INPUT", ["inputs[text]"], "invalid shape [-1]"),
    ("elements do not fill shape", INVALID, "INVALID_INPUT", ["inputs[text]"], "2 elements in contents.bytes_contents"),
    ("no texts", INVALID, "INVALID_INPUT", ["inputs[text]"], "at least one text"),
    ("too many texts", INVALID, "TOO_MANY_INPUTS", ["inputs[text]"], "limit of 100"),
    ("invalid utf-8", INVALID, "INVALID_INPUT", ["inputs[text]"], "element 1 is not valid UTF-8"),
    ("invalid utf-8 raw", INVALID, "INVALID_INPUT", ["inputs[text]"], "element 0 is not valid UTF-8"),
    ("raw cut inside a length", INVALID, "INVALID_INPUT", ["inputs[text]"], "inside the 4-byte length"),
    ("raw cut inside an element", INVALID, "INVALID_INPUT", ["inputs[text]"], "claims 10 bytes"),
    ("raw holds more elements", INVALID, "INVALID_INPUT", ["inputs[text]"], "more than the 1 elements its shape needs"),
    ("raw holds fewer elements", INVALID, "INVALID_INPUT", ["inputs[text]"], "raw data holds 1 elements, its shape needs 3"),
    ("raw count", INVALID, "INVALID_INPUT", ["raw_input_contents"], "2 raw_input_contents for 1 inputs"),
    ("raw and contents", INVALID, "INVALID_INPUT", ["inputs[text]"], "not both"),
    ("normalize not a bool", INVALID, "INVALID_INPUT", ["parameters[normalize]"], "must be a bool"),
    ("top_k not an int", INVALID, "INVALID_INPUT", ["parameters[top_k]"], "must be an integer"),
    ("negative top_n", INVALID, "INVALID_INPUT", ["parameters[top_n]"], "must be an integer >= 0"),
    ("unknown output", INVALID, "INVALID_INPUT", ["outputs[scores]"], "unknown output 'scores'"),
    ("classification extension", INVALID, "INVALID_INPUT", ["outputs[scores]"], "classification extension"),
    ("sequence", INVALID, "INVALID_INPUT", ["parameters[sequence_id]"], "stateless"),
    # A stage's own error passes through unchanged (its field names the text by index, as in the native API).
    ("too long", INVALID, "INPUT_TOO_LONG", ["inputs[1]"], "limit of 64"),
]
# fmt: on


@pytest.mark.parametrize(("case", "code", "reason", "fields", "message"), INFER_ERROR_CASES)
async def test_infer_errors(
    stack: Stack, case: str, code: grpc.StatusCode, reason: str, fields: list[str], message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.oip.ModelInfer(INFER_ERRORS[case]())
    d = details_of(caught.value)
    assert (d.code, d.reason, d.fields) == (code, reason, fields)
    assert message in d.message


@pytest.mark.parametrize(
    ("call", "code", "reason", "message"),
    [
        ("metadata of unknown", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", "model 'nope' not found"),
        ("load unknown", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", "model 'nope' not found"),
        ("load with config", grpc.StatusCode.UNIMPLEMENTED, "UNSUPPORTED", "loading with parameters (config)"),
        ("unload no name", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", "model_name is required"),
        ("unload with parameters", grpc.StatusCode.UNIMPLEMENTED, "UNSUPPORTED", "unloading with parameters (x)"),
        ("unload unknown", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", "model 'nope' not found"),
        ("statistics of unknown", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", "model 'nope' not found"),
        ("statistics of unknown version", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", "no version 7"),
        ("load no name", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", "model_name is required"),
    ],
)
async def test_other_errors(stack: Stack, call: str, code: grpc.StatusCode, reason: str, message: str) -> None:
    oip = stack.oip
    load_with_config = pb.RepositoryModelLoadRequest(model_name="tiny-embed")
    load_with_config.parameters["config"].string_param = "{}"
    unload_with_x = pb.RepositoryModelUnloadRequest(model_name="tiny-embed")
    unload_with_x.parameters["x"].bool_param = True
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "metadata of unknown": lambda: oip.ModelMetadata(pb.ModelMetadataRequest(name="nope")),
        "load unknown": lambda: oip.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope")),
        "load with config": lambda: oip.RepositoryModelLoad(load_with_config),
        "unload with parameters": lambda: oip.RepositoryModelUnload(unload_with_x),
        "unload no name": lambda: oip.RepositoryModelUnload(pb.RepositoryModelUnloadRequest()),
        "unload unknown": lambda: oip.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="nope")),
        "statistics of unknown": lambda: oip.ModelStatistics(pb.ModelStatisticsRequest(name="nope")),
        "statistics of unknown version": lambda: oip.ModelStatistics(
            pb.ModelStatisticsRequest(name="tiny-embed", version="7")
        ),
        "load no name": lambda: oip.RepositoryModelLoad(pb.RepositoryModelLoadRequest()),
    }
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await calls[call]()
    d = details_of(caught.value)
    assert (d.code, d.reason) == (code, reason)
    assert message in d.message
