"""Tracing without a server: coalesced runs and their links, the OTLP endpoint from flags or environment, and what
`tandem serve` passes to its processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.coalescer import Coalescer
from services.common import tracing
from services.inference.settings import InferenceSettings
from tandem.cli.supervisor import Replica, Supervisor


async def test_a_merged_run_belongs_to_its_first_caller_and_links_the_others() -> None:
    exporter = InMemorySpanExporter()
    previous = tracing.install(tracing.provider_for("tandem-test", [SimpleSpanProcessor(exporter)]))
    try:
        release = asyncio.Event()

        async def run(key: str, inputs: list[str], deadline: float) -> list[str]:
            await release.wait()
            return inputs

        coalescer: Coalescer[str, list[str]] = Coalescer(run, lambda r, counts: [r] * len(counts), max_inflight=1)
        tracer = tracing.tracer()

        async def call(name: str) -> None:
            with tracer.start_as_current_span(name):
                await coalescer.submit("k", [name], 1e12)

        first = asyncio.create_task(call("first"))
        await asyncio.sleep(0.01)
        merged = [asyncio.create_task(call(name)) for name in ("second", "third")]
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(first, *merged)
    finally:
        tracing.install(previous)
    spans = {s.name: s for s in exporter.get_finished_spans() if s.name != "coalesced_run"}
    runs = [s for s in exporter.get_finished_spans() if s.name == "coalesced_run"]
    assert len(runs) == 2
    lone = next(r for r in runs if r.attributes and r.attributes["tandem.callers"] == 1)
    shared = next(r for r in runs if r.attributes and r.attributes["tandem.callers"] == 2)
    assert lone.parent is not None and lone.parent.span_id == spans["first"].context.span_id
    assert shared.parent is not None and shared.parent.span_id == spans["second"].context.span_id
    assert [link.context.span_id for link in shared.links] == [spans["third"].context.span_id]
    assert [link.context.span_id for link in spans["third"].links] == [shared.context.span_id]


def test_endpoint_from_flag_or_standard_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert InferenceSettings.from_args([], "inference").otlp_endpoint == "http://collector:4317"
    flagged = InferenceSettings.from_args(["--otlp-endpoint", "http://other:4317"], "inference")
    assert flagged.otlp_endpoint == "http://other:4317"
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    monkeypatch.setenv("TANDEM_INFERENCE_OTLP_ENDPOINT", "http://mine:4317")
    assert InferenceSettings.from_args([], "inference").otlp_endpoint == "http://mine:4317"


def test_configure_exports_over_otlp_under_the_service_name() -> None:
    previous = tracing.install(None)
    try:
        assert tracing.configure("http://127.0.0.1:4317", "postprocess", sample_ratio=0.5)
        provider = tracing._provider
        assert provider is not None
        assert provider.resource.attributes["service.name"] == "tandem-postprocess"
        assert tracing.server_interceptors("postprocess")
    finally:
        tracing.shutdown()
        tracing.install(previous)


def test_serve_passes_the_endpoint_to_every_process(tmp_path: Path) -> None:
    supervisor = Supervisor(otlp_endpoint="http://collector:4317", run_dir=tmp_path)
    for role in ("gateway", "tokenizer", "inference", "postprocess"):
        args = supervisor._args(Replica(f"{role}-0", role, "127.0.0.1:0"))
        assert args[args.index("--otlp-endpoint") + 1] == "http://collector:4317"
