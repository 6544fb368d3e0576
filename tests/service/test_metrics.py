"""Metrics, timing trailers and the access log over real in-process stages, each server with its own registry."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.priority import PRIORITY_HEADER, PriorityInterceptor
from services.common import timing
from services.common.metrics import (
    CallObserver,
    GatewayMetrics,
    InferenceMetrics,
    MetricsInterceptor,
    MetricsServer,
    ServiceMetrics,
    TokenizerMetrics,
    serve_metrics,
)
from tandem.gateway.v1 import gateway_pb2
from tests import ROOT
from tests.fixtures import tiny_models
from tests.harness import Stack, serve_stack

MiB = 1024 * 1024
DASHBOARD = ROOT / "deploy" / "grafana" / "tandem-dashboard.json"


@dataclass
class Observed:
    stack: Stack
    scrapers: dict[str, MetricsServer]
    registries: dict[str, CollectorRegistry]


@pytest.fixture(scope="module")
async def observed(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Observed]:
    """The four services in-process, each with its own registry, interceptor and /metrics on a free port."""
    registries = {name: CollectorRegistry() for name in ("gateway", "tokenizer", "inference", "postprocess")}
    inference_metrics = InferenceMetrics(registries["inference"])
    observers: dict[str, list[CallObserver]] = {
        "gateway": [GatewayMetrics(registries["gateway"]).observe],
        "tokenizer": [TokenizerMetrics(registries["tokenizer"]).observe],
    }

    def interceptors(role: str) -> list[grpc.aio.ServerInterceptor]:
        metrics = MetricsInterceptor(ServiceMetrics(role, registries[role]), observers.get(role, []))
        return [metrics, PriorityInterceptor()] if role == "gateway" else [metrics]

    async with serve_stack(
        served_repository,
        tmp_path_factory.mktemp("home"),
        inference_options={"watch_s": None, "observers": inference_metrics.recorder},
        pipeline_options={"max_inputs": 100},
        interceptors=interceptors,
    ) as stack:
        inference_metrics.watch(stack.core)
        scrapers: dict[str, MetricsServer] = {}
        try:
            for name, server in stack.servers.items():
                scraper = serve_metrics(registries[name], server.address, 0)
                assert scraper is not None
                scrapers[name] = scraper
            yield Observed(stack, scrapers, registries)
        finally:
            for scraper in scrapers.values():
                scraper.close()


def scrape(observed: Observed, service: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one service's /metrics, fetched over HTTP: (name, sorted labels) -> value."""
    scraper = observed.scrapers[service]
    with urllib.request.urlopen(f"http://{scraper.host}:{scraper.port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, /, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def embed_with_trailers(observed: Observed, texts: list[str]) -> tuple[Any, dict[str, float]]:
    call = observed.stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=texts))
    reply = await call
    trailers = dict(await call.trailing_metadata())
    return reply, timing.parse_timings(str(trailers[timing.TIMING_KEY]))


async def test_requests_are_counted_by_service_method_and_code(observed: Observed) -> None:
    before = {name: scrape(observed, name) for name in observed.scrapers}
    await observed.stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["a b c", "d e"]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await observed.stack.stub.Embed(gateway_pb2.EmbedRequest(model="no-such-model", inputs=["x"]))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    embed = "/tandem.gateway.v1.GatewayService/Embed"
    # A server counts a call once its handler has returned, which may be just after the caller has the answer.
    for _ in range(100):
        after = {name: scrape(observed, name) for name in observed.scrapers}
        if (
            value(after["gateway"], "tandem_request_duration_seconds_count", service="gateway", method=embed)
            - value(before["gateway"], "tandem_request_duration_seconds_count", service="gateway", method=embed)
            >= 2
        ):
            break
        await asyncio.sleep(0.02)

    def delta(stage: str, name: str, /, **labels: str) -> float:
        return value(after[stage], name, **labels) - value(before[stage], name, **labels)

    assert delta("gateway", "tandem_requests_total", service="gateway", method=embed, code="OK") == 1
    assert delta("gateway", "tandem_requests_total", service="gateway", method=embed, code="NOT_FOUND") == 1
    assert delta("gateway", "tandem_request_duration_seconds_count", service="gateway", method=embed) == 2
    assert value(after["gateway"], "tandem_requests_in_flight", service="gateway", method=embed) == 0
    # The unknown model failed at the inference stage's GetModel, and the gateway kept its code.
    get_model = "/tandem.inference.v1.InferenceService/GetModel"
    assert delta("inference", "tandem_requests_total", service="inference", method=get_model, code="NOT_FOUND") == 1
    infer = "/tandem.inference.v1.InferenceService/Infer"
    assert delta("inference", "tandem_requests_total", service="inference", method=infer, code="OK") == 1
    tokenize = "/tandem.tokenizer.v1.TokenizerService/Tokenize"
    assert delta("tokenizer", "tandem_requests_total", service="tokenizer", method=tokenize, code="OK") == 1
    assert delta("tokenizer", "tandem_tokenizer_request_tokens_count", model="tiny-embed") == 1
    assert delta("tokenizer", "tandem_tokenizer_request_tokens_sum", model="tiny-embed") >= 2
    pool = "/tandem.postprocess.v1.PostprocessService/Pool"
    assert delta("postprocess", "tandem_requests_total", service="postprocess", method=pool, code="OK") == 1
    # Per-stage durations and inputs at the gateway; only the model that served a call labels it.
    for stage in ("tokenize", "infer", "postprocess"):
        assert delta("gateway", "tandem_gateway_stage_seconds_count", stage=stage) == 1
    assert delta("gateway", "tandem_gateway_inputs_total", model="tiny-embed") == 2
    assert not any(
        name.startswith("tandem_") and ("model", "no-such-model") in labels for name, labels in after["gateway"]
    )
    # Health checks are not requests.
    assert not any("grpc.health" in str(labels) for _, labels in after["inference"])


async def test_gateway_calls_are_counted_by_priority_and_code(observed: Observed) -> None:
    name = "tandem_gateway_priority_requests_total"
    before = scrape(observed, "gateway")
    stub = observed.stack.stub
    request = gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["a"])
    await stub.Embed(request, metadata=((PRIORITY_HEADER, "low"),))
    await stub.Embed(request)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(
            gateway_pb2.EmbedRequest(model="no-such-model", inputs=["x"]), metadata=((PRIORITY_HEADER, "1"),)
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    expected = {("low", "OK"): 1, ("normal", "OK"): 1, ("high", "NOT_FOUND"): 1}
    for _ in range(100):  # counted once each handler has returned
        after = scrape(observed, "gateway")
        counts = {
            key: value(after, name, priority=key[0], code=key[1]) - value(before, name, priority=key[0], code=key[1])
            for key in expected
        }
        if counts == expected:
            break
        await asyncio.sleep(0.02)
    assert counts == expected


async def test_batches_queue_depth_and_model_states_are_exported(observed: Observed) -> None:
    await observed.stack.stub.Embed(
        gateway_pb2.EmbedRequest(model="tiny-embed", inputs=tiny_models.embedding_texts(n=5))
    )
    samples = scrape(observed, "inference")
    assert value(samples, "tandem_inference_batch_size_count", model="tiny-embed") >= 1
    assert value(samples, "tandem_inference_batch_size_sum", model="tiny-embed") >= 5
    assert value(samples, "tandem_inference_batch_tokens_sum", model="tiny-embed") >= 5
    assert value(samples, "tandem_inference_queue_seconds_count", model="tiny-embed") >= 1
    assert value(samples, "tandem_inference_compute_seconds_count", model="tiny-embed") >= 1
    assert ("tandem_inference_queue_depth", (("model", "tiny-embed"),)) in samples
    assert value(samples, "tandem_inference_queue_depth", model="tiny-embed") == 0
    assert value(samples, "tandem_model_state", model="tiny-embed", version="1", state="ready") == 1
    assert value(samples, "tandem_model_state", model="tiny-embed", version="1", state="loading") == 0


async def test_stage_timings_come_back_in_the_trailers(observed: Observed) -> None:
    _, timings = await embed_with_trailers(observed, ["one two three"])
    assert set(timings) == {"tokenize", "infer", "queue", "compute", "postprocess", "total"}
    assert all(seconds >= 0 for seconds in timings.values())
    # Queue and compute are the inference stage's share of the gateway's call to it; 10 µs of rounding slack.
    assert timings["queue"] + timings["compute"] <= timings["infer"] + 1e-5
    assert timings["tokenize"] + timings["infer"] + timings["postprocess"] <= timings["total"] + 1e-5
    assert timings["compute"] > 0


async def test_trailer_text_is_milliseconds_in_pipeline_order(observed: Observed) -> None:
    call = observed.stack.stub.Classify(gateway_pb2.ClassifyRequest(model="tiny-sentiment", inputs=["good"]))
    await call
    text = str(dict(await call.trailing_metadata())[timing.TIMING_KEY])
    assert re.fullmatch(r"(\w+=\d+\.\d\dms, )+total=\d+\.\d\dms", text), text
    assert [part.split("=")[0] for part in text.split(", ")] == [
        "tokenize",
        "infer",
        "queue",
        "compute",
        "postprocess",
        "total",
    ]


async def test_every_caller_of_a_coalesced_run_gets_its_timings(observed: Observed) -> None:
    results = await asyncio.gather(*(embed_with_trailers(observed, [f"text number {i}"]) for i in range(8)))
    for reply, timings in results:
        assert len(reply.embeddings) == 1
        assert {"tokenize", "infer", "queue", "compute", "postprocess", "total"} <= set(timings)


async def test_one_access_log_line_per_request(observed: Observed, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tandem.access"):
        await observed.stack.stub.Embed(
            gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["a b", "c"]),
            metadata=(("x-request-id", "req-123"),),
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await observed.stack.stub.Embed(gateway_pb2.EmbedRequest(model="no-such-model", inputs=["x"]))
    lines = [r for r in caplog.records if r.name == "tandem.access"]
    assert len(lines) == 2
    ok, failed = (getattr(r, "fields") for r in lines)  # noqa: B009
    assert ok["method"] == "/tandem.gateway.v1.GatewayService/Embed"
    assert ok["code"] == "OK" and ok["model"] == "tiny-embed" and ok["version"] == "1"
    assert ok["inputs"] == 2 and ok["tokens"] >= 3
    assert {"tokenize_ms", "infer_ms", "queue_ms", "compute_ms", "postprocess_ms", "total_ms"} <= set(ok)
    assert lines[0].request_id == "req-123"  # type: ignore[attr-defined]
    assert failed["code"] == "NOT_FOUND" and failed["model"] == "no-such-model" and failed["inputs"] == 1
    json.dumps(ok)  # the JSON formatter writes the fields as they are


async def test_json_logs_write_the_access_line_as_one_json_object(
    observed: Observed, caplog: pytest.LogCaptureFixture
) -> None:
    """--json-logs: one line per request at the gateway, with model, inputs, tokens, code, durations and the id."""
    from services.common.logging import _JsonFormatter, configure

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure("INFO", json_logs=True, service="gateway")
        (handler,) = root.handlers
        formatter = handler.formatter
    finally:
        root.handlers[:], root.level = handlers, level
    assert isinstance(formatter, _JsonFormatter)
    with caplog.at_level(logging.INFO, logger="tandem.access"):
        await observed.stack.stub.Embed(
            gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["json line", "two"]),
            metadata=(("x-request-id", "json-1"),),
        )
    (record,) = [r for r in caplog.records if r.name == "tandem.access"]
    text = formatter.format(record)
    assert "\n" not in text
    line = json.loads(text)
    assert (line["request_id"], line["logger"], line["level"]) == ("json-1", "tandem.access", "INFO")
    assert (line["method"], line["code"]) == ("/tandem.gateway.v1.GatewayService/Embed", "OK")
    assert (line["model"], line["inputs"]) == ("tiny-embed", 2) and line["tokens"] >= 3
    durations = {"tokenize_ms", "infer_ms", "queue_ms", "compute_ms", "postprocess_ms", "total_ms"}
    assert durations <= set(line) and all(isinstance(line[k], float) for k in durations)


async def test_inference_reports_its_own_split(observed: Observed) -> None:
    """The inference stage's trailer, which the gateway folds into its caller's."""
    from services.common import tensors
    from tandem.inference.v1 import inference_pb2, inference_pb2_grpc
    from tandem.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

    async with (
        grpc.aio.insecure_channel(observed.stack.servers["tokenizer"].address) as tch,
        grpc.aio.insecure_channel(observed.stack.servers["inference"].address) as ich,
    ):
        tokenized = await tokenizer_pb2_grpc.TokenizerServiceStub(tch).Tokenize(
            tokenizer_pb2.TokenizeRequest(model="tiny-embed", texts=["hello there"], truncate=True)
        )
        call = inference_pb2_grpc.InferenceServiceStub(ich).Infer(
            inference_pb2.InferRequest(model="tiny-embed", batch=tokenized.batch)
        )
        await call
        timings = timing.parse_timings(str(dict(await call.trailing_metadata())[timing.TIMING_KEY]))
    assert set(timings) == {"queue", "compute", "total"}
    assert timings["queue"] + timings["compute"] <= timings["total"] + 1e-5
    assert len(tensors.decode(tokenized.batch.cu_seqlens, "cu_seqlens")) == 2


def registered_names(registries: dict[str, CollectorRegistry]) -> set[str]:
    names: set[str] = set()
    for registry in registries.values():
        for family in registry.collect():
            names.add(family.name)
            names.update(s.name for s in family.samples)
    return names


async def test_dashboard_uses_only_metrics_that_exist(observed: Observed) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs
    used = {name for expr in exprs for name in re.findall(r"\b(tandem_[a-z_]+)", expr)}
    known = registered_names(observed.registries)
    # GPU memory is only exported where CUDA is initialised.
    known |= {"tandem_gpu_memory_allocated_bytes", "tandem_gpu_memory_reserved_bytes"}
    assert used and used <= known, used - known


async def test_a_stream_counts_once_when_it_ends(observed: Observed) -> None:
    before = scrape(observed, "gateway")

    async def requests() -> AsyncIterator[gateway_pb2.EmbedStreamRequest]:
        for i in range(3):
            yield gateway_pb2.EmbedStreamRequest(
                id=str(i), request=gateway_pb2.EmbedRequest(model="tiny-embed", inputs=[f"text {i}"])
            )

    replies = [reply async for reply in observed.stack.stub.EmbedStream(requests())]
    assert len(replies) == 3
    after = scrape(observed, "gateway")
    stream = "/tandem.gateway.v1.GatewayService/EmbedStream"
    labels = {"service": "gateway", "method": stream}
    assert (
        value(after, "tandem_requests_total", code="OK", **labels)
        - value(before, "tandem_requests_total", code="OK", **labels)
        == 1
    )
    assert value(after, "tandem_requests_in_flight", **labels) == 0


async def test_text_logs_escape_and_quote_what_callers_choose(
    observed: Observed, caplog: pytest.LogCaptureFixture
) -> None:
    """A model name with a line break, a NUL and a forged field, and a request id with spaces, quotes and '=': the
    text access line stays one line whose fields cannot be forged; the JSON line stays valid JSON with the raw text."""
    from services.common.logging import _JsonFormatter, _TextFormatter

    evil_model = 'x\nFORGED INFO tandem.access: code=OK\x00 "'
    evil_id = 'id" code=OK model="tiny-embed'
    with caplog.at_level(logging.INFO, logger="tandem.access"), pytest.raises(grpc.aio.AioRpcError) as caught:
        await observed.stack.stub.Embed(
            gateway_pb2.EmbedRequest(model=evil_model, inputs=["x"]), metadata=(("x-request-id", evil_id),)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (record,) = [r for r in caplog.records if r.name == "tandem.access"]
    text = _TextFormatter("[%(request_id)s] %(message)s").format(record)
    assert "\n" not in text and "\x00" not in text
    assert text.startswith(f"[{json.dumps(evil_id)}] ")  # quoted: its 'code=OK' is inside the quotes
    fields = text.removeprefix(f"[{json.dumps(evil_id)}] ")
    assert f" model={json.dumps(evil_model)} " in fields  # quoted, with \n and \u0000 escaped
    assert fields.replace(json.dumps(evil_model), "").count("code=") == 1 and " code=INVALID_ARGUMENT " in fields
    line = json.loads(_JsonFormatter().format(record))
    assert (line["model"], line["request_id"], line["code"]) == (evil_model, evil_id, "INVALID_ARGUMENT")


def test_text_log_lines_escape_control_characters_in_any_message() -> None:
    """Any log call that formats a caller's value into its message (not only the access log) stays one line; a
    traceback keeps its own lines."""
    from services.common.logging import _TextFormatter

    formatter = _TextFormatter("%(message)s")
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "key %s refused", ("a\r\nb\x1b[31m",), None)
    assert formatter.format(record) == "key a\\r\\nb\\u001b[31m refused"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    lines = formatter.format(failed).splitlines()
    assert lines[0] == "failed" and lines[1] == "Traceback (most recent call last):"
