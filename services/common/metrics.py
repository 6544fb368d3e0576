"""Prometheus metrics of every service: the request interceptor, stage-specific metrics and the /metrics server.

Each service process serves one registry. `__main__` passes prometheus_client's default REGISTRY (which also
carries the process_* and python_* collectors); tests that run four services in one process give each server a
fresh `CollectorRegistry`, so the same metric names never collide and every scrape reads one service.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_wsgi_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common import timing
from services.common.logging import log_value
from services.common.server import add_trailers

log = logging.getLogger(__name__)
access_log = logging.getLogger("tandem.access")

# Stage calls take from a fraction of a millisecond (postprocess) to seconds (a large batch on CPU).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

# Health checks (the gateway polls every stage each second) and reflection would drown the request rates.
UNMEASURED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# What one finished call hands to a service's own observers: method, status code name, seconds, its record.
CallObserver = Callable[[str, str, float, timing.CallRecord], None]

# Streams that multiplex calls of another method (services.common.multiplex): each of their requests is counted,
# timed and tracked as a call of that method, so that the request metrics read the same whichever way they came.
MULTIPLEXED = {"/tandem.inference.v1.InferenceService/InferStream": "/tandem.inference.v1.InferenceService/Infer"}


class MessageMetrics(Protocol):
    """Where the requests of a multiplexed stream are counted (see message_metrics)."""

    def started(self) -> None: ...

    def finished(self, code: str, seconds: float) -> None: ...


_message_metrics: contextvars.ContextVar[MessageMetrics | None] = contextvars.ContextVar(
    "tandem_message_metrics", default=None
)


def message_metrics() -> MessageMetrics | None:
    """Inside a multiplexed stream's handler: where its requests are counted (None when unmeasured)."""
    return _message_metrics.get()


class ServiceMetrics:
    """The request metrics every service has, labelled with the service name, and its health status."""

    def __init__(self, service: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.service = service
        self.registry = registry
        self.requests = Counter(
            "tandem_requests",
            "RPCs finished, by gRPC method and status code",
            ["service", "method", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "tandem_request_duration_seconds",
            "Time from receiving an RPC to its status (whole stream for streaming RPCs)",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "tandem_requests_in_flight",
            "RPCs being handled now",
            ["service", "method"],
            registry=registry,
        )
        # From the start, so that every process says which stage it is even before it serves (the alerting rules
        # also join process_start_time_seconds to it on job and instance, to name a restarting replica's stage).
        self.serving = Gauge(
            "tandem_serving",
            "1 while the process's gRPC health status is SERVING, 0 while NOT_SERVING (warming up, draining)",
            ["service"],
            registry=registry,
        ).labels(service)
        self.serving.set(0)

    def set_serving(self, serving: bool) -> None:
        self.serving.set(1 if serving else 0)


# The aio context can report the raw integer code rather than the enum.
_CODE_NAMES: dict[object, str] = {code.value[0]: code.name for code in grpc.StatusCode}
_CODE_NAMES.update({code: code.name for code in grpc.StatusCode})


def _code_name(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    code = context.code()
    return "OK" if code is None else _CODE_NAMES.get(code, "UNKNOWN")


class _MethodMetrics:
    """One method's metric children, looked up once: `.labels()` takes a lock and builds a key on every use. Also
    what a multiplexed stream counts its requests on (MessageMetrics)."""

    def __init__(self, metrics: ServiceMetrics, method: str) -> None:
        self.in_flight = metrics.in_flight.labels(metrics.service, method)
        self.duration = metrics.duration.labels(metrics.service, method)
        self._requests = metrics.requests
        self._labels = (metrics.service, method)
        self._by_code: dict[str, Counter] = {}

    def count(self, code: str) -> None:
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self._requests.labels(*self._labels, code)
        counter.inc()

    def started(self) -> None:
        self.in_flight.inc()

    def finished(self, code: str, seconds: float) -> None:
        self.count(code)
        self.duration.observe(seconds)
        self.in_flight.dec()


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts, times and tracks every RPC; sends its stage timings in the `x-tandem-timing` trailer.

    Runs outside the error table, so it sees the final status code of domain errors too. Observers get each
    finished call (the gateway's stage histograms and access log).
    """

    def __init__(self, metrics: ServiceMetrics, observers: Iterable[CallObserver] = ()) -> None:
        self.metrics = metrics
        self.observers = tuple(observers)
        self._methods: dict[str, _MethodMetrics] = {}

    def _finish(
        self,
        method: str,
        m: _MethodMetrics,
        context: grpc.aio.ServicerContext[Any, Any],
        started: float,
        record: timing.CallRecord,
        cancelled: bool = False,
    ) -> None:
        code = "CANCELLED" if cancelled else _code_name(context)
        self._record(method, m, code, time.perf_counter() - started, record)

    def _record(self, method: str, m: _MethodMetrics, code: str, seconds: float, record: timing.CallRecord) -> None:
        m.count(code)
        m.duration.observe(seconds)
        m.in_flight.dec()
        for observe in self.observers:
            try:
                observe(method, code, seconds, record)
            except Exception:  # an observer must never fail the call it watches
                log.exception("observing %s failed", method)

    def _method(self, method: str) -> _MethodMetrics:
        m = self._methods.get(method)
        if m is None:  # only methods with a handler get here, so the table is bounded by the services served
            m = self._methods[method] = _MethodMetrics(self.metrics, method)
        return m

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(UNMEASURED_PREFIXES):
            return handler
        m = self._method(method)
        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                record = timing.begin()
                started = time.perf_counter()
                m.in_flight.inc()
                try:
                    response = await inner(request, context)
                except asyncio.CancelledError:
                    self._finish(method, m, context, started, record, cancelled=True)
                    raise
                except BaseException:
                    self._finish(method, m, context, started, record)
                    raise
                seconds = record.timings["total"] = time.perf_counter() - started
                add_trailers(context, (timing.TIMING_KEY, timing.format_timings(record.timings)))
                # Counted and logged (access log, stage histograms) once the answer is on its way: on the next turn
                # of the event loop, after grpc has sent it, instead of ahead of it (about 0.05 ms a call).
                asyncio.get_running_loop().call_soon(self._record, method, m, _code_name(context), seconds, record)
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream is not None:
            inner_ss: Any = handler.stream_stream
            carried = self._method(MULTIPLEXED[method]) if method in MULTIPLEXED else None

            async def stream_stream(request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if carried is not None:
                    _message_metrics.set(carried)
                record = timing.begin()
                started = time.perf_counter()
                m.in_flight.inc()
                cancelled = False
                try:
                    async with contextlib.aclosing(inner_ss(request_iterator, context)) as responses:
                        async for response in responses:
                            yield response
                except (asyncio.CancelledError, GeneratorExit):
                    cancelled = True
                    raise
                finally:
                    self._finish(method, m, context, started, record, cancelled)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            # (A coroutine that writes with context.write, like grpc's health Watch, is left unmeasured.)
            inner_us: Any = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                record = timing.begin()
                started = time.perf_counter()
                m.in_flight.inc()
                cancelled = False
                try:
                    async with contextlib.aclosing(inner_us(request, context)) as responses:
                        async for response in responses:
                            yield response
                    # Timings known only at the end of the stream (time to first token, tokens/s) go in its trailer.
                    record.timings["total"] = time.perf_counter() - started
                    trailer = [(timing.TIMING_KEY, timing.format_timings(record.timings))]
                    if "generated_tokens" in record.fields:
                        trailer.append((timing.GENERATION_KEY, timing.format_generation(record.fields)))
                    add_trailers(context, *trailer)
                except (asyncio.CancelledError, GeneratorExit):
                    cancelled = True
                    raise
                finally:
                    self._finish(method, m, context, started, record, cancelled)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


# ----------------------------------------------------------------------------------------------------------------------
# The gateway


class GatewayMetrics:
    """Per-stage durations and inputs per model, observed from each finished call's record; the access log."""

    STAGES = ("tokenize", "infer", "postprocess")

    def __init__(self, registry: CollectorRegistry = REGISTRY, *, access_log_enabled: bool = True) -> None:
        self.stage_seconds = Histogram(
            "tandem_gateway_stage_seconds",
            "Time a public call spent in each stage call, as the gateway saw it",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inputs = Counter(
            "tandem_gateway_inputs",
            "Texts (or documents) answered, by the model that served them",
            ["model"],
            registry=registry,
        )
        self.by_priority = Counter(
            "tandem_gateway_priority_requests",
            "Calls answered, by the priority they ran at and their status code (RESOURCE_EXHAUSTED: refused for load)",
            ["priority", "code"],
            registry=registry,
        )
        self.access_log_enabled = access_log_enabled
        # Children looked up once per stage and model: observe runs on every public call.
        self._stage = functools.cache(self.stage_seconds.labels)
        self._inputs = functools.cache(self.inputs.labels)
        self._by_priority = functools.cache(self.by_priority.labels)

    def observe(self, method: str, code: str, seconds: float, record: timing.CallRecord) -> None:
        for name in self.STAGES:
            if name in record.timings:
                self._stage(name).observe(record.timings[name])
        model, inputs = record.fields.get("served_model"), record.fields.get("inputs")
        # Only the model that served a call labels it: the name a caller sent is unbounded.
        if code == "OK" and isinstance(model, str) and isinstance(inputs, int):
            self._inputs(model).inc(inputs)
        level = record.fields.get("priority")  # one of three names, set by gateway.priority for data-plane calls
        if isinstance(level, str):
            self._by_priority(level, code).inc()
        if self.access_log_enabled and access_log.isEnabledFor(logging.INFO):
            self.log(method, code, seconds, record)

    @staticmethod
    def log(method: str, code: str, seconds: float, record: timing.CallRecord) -> None:
        facts = dict(record.fields)
        served = facts.pop("served_model", None)
        if served is not None:  # the name that answered, rather than the alias or empty name that was asked for
            facts["model"] = served
        stages = {f"{name}_ms": round(s * 1000, 3) for name, s in record.timings.items() if name != "total"}
        fields: dict[str, object] = {
            "method": method,
            "code": code,
            **facts,
            **stages,
            "total_ms": round(seconds * 1000, 3),
        }
        text = " ".join(f"{k}={log_value(v)}" for k, v in fields.items())
        access_log.info("%s", text, extra={"fields": fields})


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer


class TokenizerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.tokens = Histogram(
            "tandem_tokenizer_request_tokens",
            "Tokens produced by one Tokenize call (all its texts)",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self._tokens = functools.cache(self.tokens.labels)  # one child per served model, looked up once

    def observe(self, method: str, code: str, seconds: float, record: timing.CallRecord) -> None:
        model, tokens = record.fields.get("served_model"), record.fields.get("tokens")
        if code == "OK" and isinstance(model, str) and isinstance(tokens, int):
            self._tokens(model).observe(tokens)


# ----------------------------------------------------------------------------------------------------------------------
# The inference stage


class ModelGauges(Protocol):
    """What the inference core reports at scrape time, per version: (model, version, state, sequences pending, the
    most sequences it admits)."""

    def gauges(self) -> list[tuple[str, str, str, int, int]]: ...

    def generation_gauges(self) -> Sequence[tuple[str, str, EngineGauges]]: ...


class EngineGauges(Protocol):
    """A text-generation version's engine at scrape time."""

    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def kv_reserved_tokens(self) -> int: ...
    @property
    def kv_used_tokens(self) -> int: ...
    @property
    def kv_capacity_tokens(self) -> int: ...


class BatchRecorder:
    """The batcher of one model reports here: how long requests queued, and each model call."""

    def __init__(self, metrics: InferenceMetrics, model: str) -> None:
        self._metrics, self._model = metrics, model
        self._queue = metrics.queue_seconds.labels(model)
        self._compute = metrics.compute_seconds.labels(model)
        self._size = metrics.batch_size.labels(model)
        self._tokens = metrics.batch_tokens.labels(model)

    def queued(self, seconds: float) -> None:
        self._queue.observe(seconds)

    def batch(self, rows: int, padded_tokens: int, seconds: float) -> None:
        self._size.observe(rows)
        self._tokens.observe(padded_tokens)
        self._compute.observe(seconds)

    # Text generation (the engine reports from the event loop as tokens reach it)
    def first_token(self, seconds: float) -> None:
        self._metrics.time_to_first_token.labels(self._model).observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self._metrics.inter_token.labels(self._model).observe(seconds)

    def generated(self, tokens: int) -> None:
        self._metrics.generated_tokens.labels(self._model).inc(tokens)


class InferenceMetrics:
    """Batching histograms; queue depth, model states and GPU memory are read from the core at scrape time."""

    STATES = ("loading", "ready", "failed", "unloading", "unloaded")

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.queue_seconds = Histogram(
            "tandem_inference_queue_seconds",
            "Time a request waited in the batcher before its first model call",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_seconds = Histogram(
            "tandem_inference_compute_seconds",
            "Duration of one padded model call",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "tandem_inference_batch_size",
            "Sequences in one model call",
            ["model"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "tandem_inference_batch_tokens",
            "Padded tokens (rows x longest) in one model call",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )

        self.time_to_first_token = Histogram(
            "tandem_generation_time_to_first_token_seconds",
            "From a sequence's admission to its first generated token (prefill and waiting for a place)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "tandem_generation_inter_token_seconds",
            "Time between consecutive generated tokens of a sequence",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.generated_tokens = Counter("tandem_generation_tokens", "Tokens generated", ["model"], registry=registry)

    def recorder(self, model: str) -> BatchRecorder:
        return BatchRecorder(self, model)

    def watch(self, core: ModelGauges) -> None:
        """Registers the scrape-time gauges of `core`."""
        self.registry.register(_InferenceCollector(core))


class _InferenceCollector(Collector):
    def __init__(self, core: ModelGauges) -> None:
        self.core = core

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "tandem_inference_queue_depth", "Sequences admitted and not yet answered, by model", labels=["model"]
        )
        capacity = GaugeMetricFamily(
            "tandem_inference_queue_capacity",
            "Sequences a model admits before refusing with RESOURCE_EXHAUSTED (its versions in memory together)",
            labels=["model"],
        )
        states = GaugeMetricFamily(
            "tandem_model_state",
            "1 for the state each loaded model version is in",
            labels=["model", "version", "state"],
        )
        pending: dict[str, int] = {}
        limits: dict[str, int] = {}
        for model, version, state, count, limit in self._gauges():
            pending[model] = pending.get(model, 0) + count
            limits[model] = limits.get(model, 0) + limit
            for name in InferenceMetrics.STATES:
                states.add_metric([model, version, name], 1.0 if name == state else 0.0)
        for model, count in sorted(pending.items()):
            depth.add_metric([model], count)
            capacity.add_metric([model], limits[model])
        yield depth
        yield capacity
        yield states
        yield from self._generation()

    def _generation(self) -> Iterator[Metric]:
        families = {
            "running": GaugeMetricFamily(
                "tandem_generation_running_sequences", "Sequences in the running batch", labels=["model", "version"]
            ),
            "waiting": GaugeMetricFamily(
                "tandem_generation_waiting_sequences",
                "Admitted sequences waiting for a place in the running batch",
                labels=["model", "version"],
            ),
            "kv_reserved_tokens": GaugeMetricFamily(
                "tandem_generation_kv_cache_reserved_tokens",
                "KV cache tokens reserved by admitted sequences (prompt + max_new_tokens each, in whole pages)",
                labels=["model", "version"],
            ),
            "kv_used_tokens": GaugeMetricFamily(
                "tandem_generation_kv_cache_used_tokens",
                "KV cache tokens holding keys and values now",
                labels=["model", "version"],
            ),
            "kv_capacity_tokens": GaugeMetricFamily(
                "tandem_generation_kv_cache_capacity_tokens", "KV cache size in tokens", labels=["model", "version"]
            ),
        }
        try:
            rows = self.core.generation_gauges()
        except RuntimeError:  # the model table changed under the scrape: skip this once
            rows = []
        for model, version, stats in rows:
            for attribute, family in families.items():
                family.add_metric([model, version], float(getattr(stats, attribute)))
        yield from families.values()
        yield from _gpu_memory()

    def _gauges(self) -> list[tuple[str, str, str, int, int]]:
        # Scrapes run in the HTTP server's thread while the event loop changes the model table: retry a torn read.
        for _ in range(3):
            try:
                return self.core.gauges()
            except RuntimeError:
                continue
        return []


def _gpu_memory() -> Iterator[Metric]:
    torch = sys.modules.get("torch")  # never imported just for this
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    allocated = GaugeMetricFamily(
        "tandem_gpu_memory_allocated_bytes", "GPU memory held by tensors of this process", labels=["device"]
    )
    reserved = GaugeMetricFamily(
        "tandem_gpu_memory_reserved_bytes", "GPU memory reserved by this process's caching allocator", labels=["device"]
    )
    for i in range(torch.cuda.device_count()):
        allocated.add_metric([str(i)], float(torch.cuda.memory_allocated(i)))
        reserved.add_metric([str(i)], float(torch.cuda.memory_reserved(i)))
    yield allocated
    yield reserved


# ----------------------------------------------------------------------------------------------------------------------
# Serving /metrics


class MetricsServer:
    """/metrics over HTTP in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._httpd, self._thread = start_wsgi_server(port, host, registry)
        self.host = host
        self.port: int = self._httpd.server_port

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def metrics_host(listen: str) -> str:
    """The host of the gRPC listener (loopback for a Unix socket), so /metrics is exposed exactly as widely."""
    if listen.startswith("unix:"):
        return "127.0.0.1"
    host = listen.rsplit(":", 1)[0].strip("[]")
    # ":50051" means every interface to gRPC too.
    return host or "0.0.0.0"


def serve_metrics(registry: CollectorRegistry, listen: str, port: int | None) -> MetricsServer | None:
    """Starts /metrics beside the gRPC listener; None when `port` is None (off). Port 0 picks a free one."""
    if port is None:
        return None
    server = MetricsServer(registry, metrics_host(listen), port)
    log.info("metrics on http://%s:%d/metrics", server.host, server.port)
    return server
