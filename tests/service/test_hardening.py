"""What outside callers broke (issue 19), each over real channels against a running stack: names that break the
naming rule, names made up by the thousand, a malformed message in an Open Inference Protocol stream, and the
methods a server lists or that Triton clients call, each answered with its code and details."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from tandem.gateway.v1 import gateway_pb2
from tandem.inference.v1 import inference_pb2
from tandem.oip.v2 import grpc_service_pb2 as pb
from tandem.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tests.harness import Stack, serve_stack
from tests.service.test_oip import infer_request
from tests.status import details_of

LONG = "m" * 300  # over the 255 bytes a file name may have: an OSError (INTERNAL) before the naming rule
NAME_RULE = "model name must be 1-128 ASCII letters"
BAD_NAMES = [LONG, "a/b", "..", "x\ny", "nul\x00", "café", "-dash", "a b", "é" * 200]


@pytest.fixture(scope="module")
async def stack(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with serve_stack(served_repository, tmp_path_factory.mktemp("home")) as running:
        yield running


async def _refused(call: Awaitable[Any]) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return details_of(caught.value)


def _gateway_calls(stack: Stack, name: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    s = stack.stub
    return {
        "Embed": lambda: s.Embed(gateway_pb2.EmbedRequest(model=name, inputs=["a"])),
        "Classify": lambda: s.Classify(gateway_pb2.ClassifyRequest(model=name, inputs=["a"])),
        "Rerank": lambda: s.Rerank(gateway_pb2.RerankRequest(model=name, query="q", documents=["a"])),
        "Tokenize": lambda: s.Tokenize(gateway_pb2.TokenizeRequest(model=name, inputs=["a"])),
        "Detokenize": lambda: s.Detokenize(gateway_pb2.DetokenizeRequest(model=name, ids=[1])),
        "GetModel": lambda: s.GetModel(gateway_pb2.GetModelRequest(model=name)),
        "Generate": lambda: s.Generate(gateway_pb2.GenerateRequest(model=name, prompt="hi")).read(),
        "Embed name:version": lambda: s.Embed(gateway_pb2.EmbedRequest(model=f"{name}:1", inputs=["a"])),
        "Embed name@alias": lambda: s.Embed(gateway_pb2.EmbedRequest(model=f"{name}@stable", inputs=["a"])),
    }


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n[:12]))
async def test_names_outside_the_rule_are_invalid_argument_on_model_everywhere(stack: Stack, name: str) -> None:
    for method, call in _gateway_calls(stack, name).items():
        d = await _refused(call())
        assert (d.code, d.reason, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", ["model"]), method
        assert NAME_RULE in d.message, method


@pytest.mark.parametrize("name", [LONG, "a/b", "x\ny", "é" * 200], ids=lambda n: repr(n[:12]))
async def test_names_outside_the_rule_are_invalid_argument_in_the_open_inference_protocol(
    stack: Stack, name: str
) -> None:
    oip = stack.oip
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "ModelInfer": lambda: oip.ModelInfer(infer_request(name, {"text": ["a"]})),
        "ModelMetadata": lambda: oip.ModelMetadata(pb.ModelMetadataRequest(name=name)),
        "ModelReady": lambda: oip.ModelReady(pb.ModelReadyRequest(name=name)),
        "ModelStatistics": lambda: oip.ModelStatistics(pb.ModelStatisticsRequest(name=name)),
        "RepositoryModelLoad": lambda: oip.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name)),
    }
    for method, call in calls.items():
        d = await _refused(call())
        assert (d.code, d.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT"), method
        assert d.fields in (["name"], ["model_name"]), method
        assert NAME_RULE in d.message, method


async def test_the_stages_check_the_rule_themselves(stack: Stack) -> None:
    """A caller that reaches a stage directly (around the gateway) gets the same answer, never INTERNAL."""
    tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(stack.stage_channels["tokenizer"])
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "inference GetModel": lambda: stack.inference.GetModel(inference_pb2.GetModelRequest(model=LONG)),
        "tokenizer Tokenize": lambda: tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(model=LONG, texts=["a"])),
        "tokenizer Detokenize": lambda: tokenizer.Detokenize(tokenizer_pb2.DetokenizeRequest(model=LONG, ids=[1])),
    }
    for method, call in calls.items():
        d = await _refused(call())
        assert (d.code, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["model"]), method
        assert NAME_RULE in d.message, method


async def test_valid_but_unknown_names_are_not_found(stack: Stack) -> None:
    d = await _refused(stack.stub.Embed(gateway_pb2.EmbedRequest(model="a" * 128, inputs=["a"])))
    assert (d.code, d.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    d = await _refused(stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed:0", inputs=["a"])))
    assert (d.code, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["model"])
    assert "version must be a number from 1 to 999999999" in d.message


async def test_five_thousand_unknown_names_leave_no_trace_in_the_registry(stack: Stack) -> None:
    """Names made up by a caller are not kept: the registry holds only the repository's models, and the negative
    cache of unknown names stays within its bound."""
    registry = stack.core.registry
    known = set(registry.entries)
    unknown = registry.repository.unknown
    semaphore = asyncio.Semaphore(64)

    async def ask(i: int) -> grpc.StatusCode:
        async with semaphore:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stack.stub.GetModel(gateway_pb2.GetModelRequest(model=f"made-up-{i}"))
            return caught.value.code()

    codes = await asyncio.gather(*(ask(i) for i in range(5000)))
    assert set(codes) == {grpc.StatusCode.NOT_FOUND}
    assert set(registry.entries) == known
    assert len(unknown) <= unknown.max_names
    assert "made-up-4999" in unknown  # the newest are remembered: asking again reads no folder
    await registry.refresh()  # what the watcher does every second: only the repository's models are read
    assert set(registry.entries) == known


async def test_an_oip_stream_answers_its_good_requests_despite_an_undecodable_one(stack: Stack) -> None:
    """A valid request, then bytes that are no ModelInferRequest, then another valid one: both valid ones are
    answered, the broken one gets an error response of its own, and the stream ends OK."""
    call = stack.channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )()
    await call.write(infer_request("tiny-embed", {"text": ["first"]}, request_id="one").SerializeToString())
    await call.write(b"\xff\xff\xff\xff")
    await call.write(infer_request("tiny-embed", {"text": ["third"]}, request_id="three").SerializeToString())
    await call.done_writing()
    answers = [response async for response in call]
    assert await call.code() == grpc.StatusCode.OK
    by_id = {a.infer_response.id: a for a in answers if not a.error_message}
    assert set(by_id) == {"one", "three"}
    (error,) = [a for a in answers if a.error_message]
    assert error.error_message.startswith("INVALID_ARGUMENT: the request does not parse")


async def test_unsupported_oip_methods_are_unimplemented_with_the_unsupported_reason(stack: Stack) -> None:
    for method in ("ModelConfig", "SystemSharedMemoryStatus", "CudaSharedMemoryRegister", "TraceSetting"):
        rpc = stack.channel.unary_unary(
            f"/inference.GRPCInferenceService/{method}",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        d = await _refused(rpc(b""))
        assert (d.code, d.reason) == (grpc.StatusCode.UNIMPLEMENTED, "UNSUPPORTED"), method
        assert f"inference.GRPCInferenceService/{method} is not supported by Tandem" in d.message
    unknown = stack.channel.unary_unary(
        "/no.such.Service/Call", request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw
    )
    d = await _refused(unknown(b""))
    assert (d.code, d.reason) == (grpc.StatusCode.UNIMPLEMENTED, "UNSUPPORTED")
    assert "'/no.such.Service/Call' is not served here" in d.message


async def _reflect(channel: grpc.aio.Channel, version: str, request: reflection_pb2.ServerReflectionRequest) -> Any:
    """One reflection request on `grpc.reflection.<version>` (v1 and v1alpha share their messages on the wire)."""
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )()
    await call.write(request)
    await call.done_writing()
    (response,) = [r async for r in call]
    return response


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_in_both_versions_lists_and_describes_every_service(stack: Stack, version: str) -> None:
    for server, channel in (("gateway", stack.channel), ("inference", stack.stage_channels["inference"])):
        listed = await _reflect(channel, version, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listed.list_services_response.service}
        assert {"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names, server
        assert "grpc.reflection.v1alpha.ServerReflection" in names, server
        for name in names:  # every listed service can be described: its file is found
            described = await _reflect(
                channel, version, reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
            )
            assert described.file_descriptor_response.file_descriptor_proto, (server, name)


async def test_health_list_gives_every_service_status(stack: Stack) -> None:
    health = health_pb2_grpc.HealthStub(stack.channel)
    listed = await health.List(health_pb2.HealthListRequest())
    serving = health_pb2.HealthCheckResponse.SERVING
    assert listed.statuses[""].status == serving
    assert listed.statuses["tandem.gateway.v1.GatewayService"].status == serving
    assert listed.statuses["inference.GRPCInferenceService"].status == serving
