"""Tracing across the four services: one trace per call from the caller's traceparent down to the model run."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.core import Pipeline
from gateway.settings import GatewaySettings
from services.common import tracing
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.harness import serve_stack

SERVICES = ("gateway", "tokenizer", "inference", "postprocess")


@dataclass
class Traced:
    stub: gateway_pb2_grpc.GatewayServiceAsyncStub
    pipeline: Pipeline
    exporter: InMemorySpanExporter


@pytest.fixture(scope="module")
async def traced(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Traced]:
    """The four services in-process on port 0, built while a provider with an in-memory exporter is installed."""
    exporter = InMemorySpanExporter()
    tracing.install(tracing.provider_for("tandem-test", [SimpleSpanProcessor(exporter)]))
    try:
        async with serve_stack(
            served_repository, tmp_path_factory.mktemp("home"), interceptors=tracing.server_interceptors
        ) as stack:
            yield Traced(stack.stub, stack.pipeline, exporter)
    finally:
        tracing.install(None)


def traceparent() -> tuple[int, int, str]:
    trace_id, span_id = secrets.randbits(128), secrets.randbits(64)
    return trace_id, span_id, f"00-{trace_id:032x}-{span_id:016x}-01"


async def finished(exporter: InMemorySpanExporter, names: Sequence[str]) -> list[ReadableSpan]:
    """The exported spans once every named one has ended (client spans end in a done-callback)."""
    for _ in range(100):
        spans = list(exporter.get_finished_spans())
        if all(any(s.name == name for s in spans) for name in names):
            return spans
        await asyncio.sleep(0.02)
    raise AssertionError(f"missing spans; have {sorted(s.name for s in exporter.get_finished_spans())}")


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    matches = [s for s in spans if s.name == name]
    assert len(matches) == 1, (name, [s.name for s in spans])
    return matches[0]


def parent_of(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None
    return next(s for s in spans if s.context.span_id == span.parent.span_id)


def descends(span: ReadableSpan, ancestor: ReadableSpan, spans: Sequence[ReadableSpan]) -> bool:
    """Whether `ancestor` is on the parent chain of `span`, across service boundaries."""
    by_id = {s.context.span_id: s for s in spans}
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        if span is ancestor:
            return True
    return False


async def test_one_call_is_one_trace_through_all_four_services(traced: Traced) -> None:
    traced.exporter.clear()
    trace_id, parent_id, header = traceparent()
    await traced.stub.Embed(
        gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["hello world", "a second input"]),
        metadata=(("traceparent", header), ("x-request-id", "trace-me")),
    )
    names = [
        "/tandem.gateway.v1.GatewayService/Embed",
        "/tandem.tokenizer.v1.TokenizerService/Tokenize",
        "/tandem.inference.v1.InferenceService/Infer",
        "/tandem.postprocess.v1.PostprocessService/Pool",
        "queue",
        "model.run",
    ]
    spans = await finished(traced.exporter, names)
    assert {s.context.trace_id for s in spans} == {trace_id}
    assert {s.attributes.get(tracing.SERVICE_ATTRIBUTE) for s in spans if s.attributes} == set(SERVICES)

    root = next(s for s in spans if s.name == names[0] and s.kind == SpanKind.SERVER)
    assert root.parent is not None and root.parent.is_remote and root.parent.span_id == parent_id
    assert root.attributes is not None
    assert root.attributes[tracing.SERVICE_ATTRIBUTE] == "gateway"
    assert root.attributes[tracing.REQUEST_ID_ATTRIBUTE] == "trace-me"
    assert root.attributes[tracing.MODEL_ATTRIBUTE] == "tiny-embed"
    assert root.attributes[tracing.INPUTS_ATTRIBUTE] == 2
    assert root.status.status_code != StatusCode.ERROR

    # Each stage's SERVER span hangs under the gateway's CLIENT span for that call, itself under the gateway's span.
    servers = {}
    for name, service in zip(names[1:4], SERVICES[1:], strict=True):
        server = next(s for s in spans if s.name == name and s.kind == SpanKind.SERVER)
        client = parent_of(server, spans)
        assert client.kind == SpanKind.CLIENT and client.name == name
        assert descends(client, root, spans)
        assert server.attributes is not None
        assert server.attributes[tracing.SERVICE_ATTRIBUTE] == service
        assert server.attributes[tracing.REQUEST_ID_ATTRIBUTE] == "trace-me"
        servers[service] = server

    queue, run = one(spans, "queue"), one(spans, "model.run")
    assert descends(run, root, spans)
    assert parent_of(queue, spans) is servers["inference"]
    assert parent_of(run, spans) is servers["inference"]
    assert run.attributes is not None
    assert run.attributes["tandem.model"] == "tiny-embed"
    assert run.attributes["tandem.model_version"] == "1"
    assert run.attributes["tandem.batch_size"] == 2
    assert isinstance(run.attributes["tandem.tokens"], int) and run.attributes["tandem.tokens"] >= 4
    assert queue.end_time is not None and run.start_time is not None and queue.end_time <= run.start_time


async def test_a_stream_is_one_trace_too(traced: Traced) -> None:
    traced.exporter.clear()
    trace_id, _, header = traceparent()

    async def requests() -> AsyncIterator[gateway_pb2.EmbedStreamRequest]:
        for i in range(3):
            yield gateway_pb2.EmbedStreamRequest(
                id=str(i), request=gateway_pb2.EmbedRequest(model="tiny-embed", inputs=[f"text {i}"])
            )

    replies = [r async for r in traced.stub.EmbedStream(requests(), metadata=(("traceparent", header),))]
    assert len(replies) == 3 and all(r.HasField("response") for r in replies)
    spans = await finished(traced.exporter, ["/tandem.gateway.v1.GatewayService/EmbedStream", "model.run"])
    assert {s.context.trace_id for s in spans} == {trace_id}
    root = one(spans, "/tandem.gateway.v1.GatewayService/EmbedStream")
    runs = [s for s in spans if s.name == "model.run"]
    assert runs and all(descends(run, root, spans) for run in runs)


async def test_a_failed_call_is_an_error_span_with_its_code(traced: Traced) -> None:
    traced.exporter.clear()
    _, _, header = traceparent()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await traced.stub.Embed(
            gateway_pb2.EmbedRequest(model="no-such-model", inputs=["x"]), metadata=(("traceparent", header),)
        )
    code = failure.value.code()
    assert code == grpc.StatusCode.NOT_FOUND
    spans = await finished(traced.exporter, ["/tandem.gateway.v1.GatewayService/Embed"])
    root = next(s for s in spans if s.kind == SpanKind.SERVER and s.name.endswith("/Embed"))
    assert root.status.status_code == StatusCode.ERROR
    assert root.status.description is not None and root.status.description.startswith("NOT_FOUND")
    assert root.attributes is not None and root.attributes[tracing.GRPC_STATUS_ATTRIBUTE] == code.value[0]
    # The stage that refused it says so too, in the same trace.
    stage = next(s for s in spans if s.kind == SpanKind.SERVER and s.name.endswith("/GetModel"))
    assert stage.status.status_code == StatusCode.ERROR
    assert stage.context.trace_id == root.context.trace_id


async def test_health_checks_are_not_traced(traced: Traced) -> None:
    traced.exporter.clear()
    # The gateway checks its stages every second over the same (traced) channels; those checks stay out of traces.
    assert await traced.pipeline.stages_serving(timeout_s=5)
    await asyncio.sleep(0.05)
    assert list(traced.exporter.get_finished_spans()) == []


async def test_tracing_off_means_no_exporter_no_interceptors_no_spans(
    traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.exporter.otlp.proto.grpc import trace_exporter

    def no_exporter(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an exporter was made with tracing off")

    monkeypatch.setattr(trace_exporter, "OTLPSpanExporter", no_exporter)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    previous = tracing.install(None)
    settings = GatewaySettings.from_args([], "gateway")
    assert settings.otlp_endpoint is None
    assert not tracing.configure(settings.otlp_endpoint, "gateway")
    try:
        assert not tracing.enabled()
        assert isinstance(tracing.tracer(), trace.NoOpTracer)
        assert tracing.server_interceptors("gateway") == [] and tracing.client_interceptors() == []
        # Even servers and channels made while tracing was on record nothing once it is off.
        traced.exporter.clear()
        await traced.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["quiet"]))
        await asyncio.sleep(0.05)
        assert list(traced.exporter.get_finished_spans()) == []
    finally:
        tracing.install(previous)


@pytest.fixture(scope="module")
async def traced_generation(
    traced: Traced, causal_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Traced]:
    """A second traced stack (the provider `traced` installed) over the tiny causal LMs."""
    async with serve_stack(
        causal_repository, tmp_path_factory.mktemp("home"), interceptors=tracing.server_interceptors
    ) as stack:
        yield Traced(stack.stub, stack.pipeline, traced.exporter)


async def test_a_generation_is_one_trace_through_all_four_services(traced_generation: Traced) -> None:
    from tandem.generation.v1 import generation_pb2

    traced = traced_generation
    traced.exporter.clear()
    trace_id, parent_id, header = traceparent()
    request = gateway_pb2.GenerateRequest(
        model="tiny-gpt2", prompt="sun", params=generation_pb2.GenerationParams(max_new_tokens=6, stop=["moon"])
    )
    responses = [r async for r in traced.stub.Generate(request, metadata=(("traceparent", header),))]
    assert responses[-1].stop_sequence == "moon"
    names = [
        "/tandem.gateway.v1.GatewayService/Generate",
        "/tandem.tokenizer.v1.TokenizerService/EncodePrompt",
        "/tandem.inference.v1.InferenceService/Generate",
        "/tandem.postprocess.v1.PostprocessService/Detokenize",
    ]
    # The inference call is cancelled at the stop string: its CLIENT span ends a moment after the others.
    for _ in range(100):
        spans = await finished(traced.exporter, names)
        clients = {s.name for s in spans if s.kind == SpanKind.CLIENT}
        if set(names[1:]) <= clients:
            break
        await asyncio.sleep(0.02)
    assert {s.context.trace_id for s in spans} == {trace_id}
    assert {s.attributes.get(tracing.SERVICE_ATTRIBUTE) for s in spans if s.attributes} == set(SERVICES)
    root = next(s for s in spans if s.name == names[0] and s.kind == SpanKind.SERVER)
    assert root.parent is not None and root.parent.span_id == parent_id
    assert root.status.status_code != StatusCode.ERROR
    for name, service in zip(names[1:], SERVICES[1:], strict=True):
        server = next(s for s in spans if s.name == name and s.kind == SpanKind.SERVER)
        assert descends(server, root, spans), name
        assert server.attributes is not None and server.attributes[tracing.SERVICE_ATTRIBUTE] == service
