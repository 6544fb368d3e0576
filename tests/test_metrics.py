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

from gateway.clients import InferenceClient, PostprocessClient, TokenizerClient
from gateway.core import Pipeline
from gateway.servicer import registrar as gateway_registrar
from services.common import timing
from services.common.metrics import (
    GatewayMetrics,
    InferenceMetrics,
    MetricsInterceptor,
    MetricsServer,
    ServiceMetrics,
    TokenizerMetrics,
    metrics_host,
    serve_metrics,
)
from services.common.repository import ModelRepository
from services.common.server import RunningServer, start_server
from services.common.settings import ServiceSettings
from services.inference.core import Inference
from services.inference.servicer import registrar as inference_registrar
from services.postprocess.core import Postprocessor
from services.postprocess.servicer import registrar as postprocess_registrar
from services.tokenizer.core import Tokenizer
from services.tokenizer.servicer import registrar as tokenizer_registrar
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.fixtures import tiny_models

MiB = 1024 * 1024
DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "tandem-dashboard.json"


@dataclass
class Observed:
    stub: Any  # GatewayServiceStub
    servers: dict[str, RunningServer]
    scrapers: dict[str, MetricsServer]
    registries: dict[str, CollectorRegistry]


@pytest.fixture(scope="module")
async def observed(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Observed]:
    """The four services in-process, each with its own registry, interceptor and /metrics on a free port."""
    registries = {name: CollectorRegistry() for name in ("gateway", "tokenizer", "inference", "postprocess")}
    inference_metrics = InferenceMetrics(registries["inference"])
    tokenizer = Tokenizer(ModelRepository(tiny_repository))
    tokenizer.preload()
    inference = Inference(
        ModelRepository(tiny_repository),
        home=tmp_path_factory.mktemp("home"),
        intra_op_threads=1,
        watch_s=None,
        observers=inference_metrics.recorder,
    )
    inference_metrics.watch(inference)
    await inference.start()

    def interceptor(name: str, *observers: Any) -> list[grpc.aio.ServerInterceptor]:
        return [MetricsInterceptor(ServiceMetrics(name, registries[name]), observers)]

    servers = {
        "tokenizer": await start_server(
            "127.0.0.1:0",
            [tokenizer_registrar(tokenizer)],
            interceptors=interceptor("tokenizer", TokenizerMetrics(registries["tokenizer"]).observe),
        ),
        "inference": await start_server(
            "127.0.0.1:0", [inference_registrar(inference)], interceptors=interceptor("inference")
        ),
        "postprocess": await start_server(
            "127.0.0.1:0",
            [postprocess_registrar(Postprocessor(ModelRepository(tiny_repository)))],
            interceptors=interceptor("postprocess"),
        ),
    }
    pipeline = Pipeline(
        TokenizerClient(servers["tokenizer"].address, 64 * MiB),
        InferenceClient(servers["inference"].address, 64 * MiB),
        PostprocessClient(servers["postprocess"].address, 64 * MiB),
        max_inputs=100,
    )
    servers["gateway"] = await start_server(
        "127.0.0.1:0",
        [gateway_registrar(pipeline)],
        interceptors=interceptor("gateway", GatewayMetrics(registries["gateway"]).observe),
    )
    scrapers: dict[str, MetricsServer] = {}
    for name, server in servers.items():
        scraper = serve_metrics(registries[name], server.address, 0)
        assert scraper is not None
        scrapers[name] = scraper
    async with grpc.aio.insecure_channel(servers["gateway"].address) as channel:
        yield Observed(gateway_pb2_grpc.GatewayServiceStub(channel), servers, scrapers, registries)
    for scraper in scrapers.values():
        scraper.close()
    await servers["gateway"].stop(0)
    await pipeline.close()
    for name in ("tokenizer", "inference", "postprocess"):
        await servers[name].stop(0)
    await inference.close()


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
    call = observed.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=texts))
    reply = await call
    trailers = dict(await call.trailing_metadata())
    return reply, timing.parse_timings(trailers[timing.TIMING_KEY])


async def test_requests_are_counted_by_service_method_and_code(observed: Observed) -> None:
    before = {name: scrape(observed, name) for name in observed.scrapers}
    await observed.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["a b c", "d e"]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await observed.stub.Embed(gateway_pb2.EmbedRequest(model="no-such-model", inputs=["x"]))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    after = {name: scrape(observed, name) for name in observed.scrapers}

    def delta(stage: str, name: str, /, **labels: str) -> float:
        return value(after[stage], name, **labels) - value(before[stage], name, **labels)

    embed = "/tandem.gateway.v1.GatewayService/Embed"
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


async def test_batches_queue_depth_and_model_states_are_exported(observed: Observed) -> None:
    await observed.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=tiny_models.embedding_texts(n=5)))
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
    call = observed.stub.Classify(gateway_pb2.ClassifyRequest(model="tiny-sentiment", inputs=["good"]))
    await call
    text = dict(await call.trailing_metadata())[timing.TIMING_KEY]
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
        await observed.stub.Embed(
            gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["a b", "c"]),
            metadata=(("x-request-id", "req-123"),),
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await observed.stub.Embed(gateway_pb2.EmbedRequest(model="no-such-model", inputs=["x"]))
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
        await observed.stub.Embed(
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
        grpc.aio.insecure_channel(observed.servers["tokenizer"].address) as tch,
        grpc.aio.insecure_channel(observed.servers["inference"].address) as ich,
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


def test_metrics_are_off_unless_a_port_is_set() -> None:
    assert ServiceSettings.from_args([], "t").metrics_port is None
    assert serve_metrics(CollectorRegistry(), "127.0.0.1:0", None) is None
    assert ServiceSettings.from_args(["--metrics-port", "0"], "t").metrics_port == 0


@pytest.mark.parametrize(
    ("listen", "host"),
    [("127.0.0.1:50051", "127.0.0.1"), ("0.0.0.0:50051", "0.0.0.0"), ("[::1]:5", "::1"), ("unix:/tmp/s", "127.0.0.1")],
)
def test_metrics_bind_where_grpc_listens(listen: str, host: str) -> None:
    assert metrics_host(listen) == host


def test_timings_round_trip() -> None:
    text = timing.format_timings({"total": 0.0051, "postprocess": 0.0003, "tokenize": 0.00041})
    assert text == "tokenize=0.41ms, postprocess=0.30ms, total=5.10ms"
    assert timing.parse_timings(text + ", junk, x=1s") == pytest.approx(
        {"tokenize": 0.00041, "postprocess": 0.0003, "total": 0.0051}
    )


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

    replies = [reply async for reply in observed.stub.EmbedStream(requests())]
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


def test_the_access_log_can_be_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    record = timing.CallRecord({"tokenize": 0.001, "total": 0.002}, {"inputs": 1, "served_model": "m"})
    with caplog.at_level(logging.INFO, logger="tandem.access"):
        GatewayMetrics(CollectorRegistry(), access_log_enabled=False).observe("/x/Y", "OK", 0.002, record)
        assert not caplog.records
        GatewayMetrics(CollectorRegistry()).observe("/x/Y", "OK", 0.002, record)
    (line,) = caplog.records
    assert getattr(line, "fields") == {  # noqa: B009
        "method": "/x/Y",
        "code": "OK",
        "inputs": 1,
        "model": "m",
        "tokenize_ms": 1.0,
        "total_ms": 2.0,
    }
