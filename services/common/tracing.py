"""OpenTelemetry tracing: one tracer provider per process, a server interceptor, and the gateway's client side.

Off unless an OTLP endpoint is configured. While off, `tracer()` is the API's no-op tracer, no server or client
interceptor is installed and no exporter exists, so the cost is a few no-op calls per request.

The provider is held here rather than as OpenTelemetry's global, which can only be set once per process: tests
install one with an in-memory exporter and remove it again (`install`), and four services sharing one test process
still tell their spans apart by the `tandem.service` attribute.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common.logging import request_id

log = logging.getLogger(__name__)

SERVICE_ATTRIBUTE = "tandem.service"
REQUEST_ID_ATTRIBUTE = "tandem.request_id"
MODEL_ATTRIBUTE = "tandem.model"
INPUTS_ATTRIBUTE = "tandem.inputs"
GRPC_STATUS_ATTRIBUTE = "rpc.grpc.status_code"

# Health checks and reflection come every second from the gateway and from probes: they would bury real traces.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")

_NO_OP = trace.NoOpTracer()
_provider: TracerProvider | None = None
_tracer: trace.Tracer = _NO_OP
# Which service the current call belongs to; set by the server interceptor, read by `_ServiceTag`.
_service: contextvars.ContextVar[str | None] = contextvars.ContextVar("tandem_service", default=None)


class _ServiceTag(SpanProcessor):
    """Stamps every span with the service whose call started it (the resource names the process, not the service)."""

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        service = _service.get()
        if service is not None:
            span.set_attribute(SERVICE_ATTRIBUTE, service)

    def on_end(self, span: ReadableSpan) -> None:
        return None


def provider_for(service_name: str, processors: Sequence[SpanProcessor], sample_ratio: float = 1.0) -> TracerProvider:
    """A provider for one process: parent-based sampling (callers' decisions win), the given span processors."""
    resource = Resource.create(
        {SERVICE_NAME: service_name, SERVICE_INSTANCE_ID: f"{socket.gethostname()}:{os.getpid()}"}
    )
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    provider.add_span_processor(_ServiceTag())
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


def install(provider: TracerProvider | None) -> TracerProvider | None:
    """Makes `provider` the one this process traces to (None: tracing off); returns the one it replaces."""
    global _provider, _tracer
    previous, _provider = _provider, provider
    _tracer = _NO_OP if provider is None else provider.get_tracer("tandem")
    return previous


def configure(endpoint: str | None, service: str, service_name: str | None = None, sample_ratio: float = 1.0) -> bool:
    """Called once from a service's __main__: exports over OTLP gRPC to `endpoint`, or leaves tracing off."""
    if not endpoint:
        install(None)
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # The exporter reads http:// as plaintext and https:// as TLS.
    exporter = OTLPSpanExporter(endpoint=endpoint)
    install(provider_for(service_name or f"tandem-{service}", [BatchSpanProcessor(exporter)], sample_ratio))
    log.info("tracing to %s as %s (sampling %.3g)", endpoint, service_name or f"tandem-{service}", sample_ratio)
    return True


def enabled() -> bool:
    return _provider is not None


def tracer() -> trace.Tracer:
    """The process's tracer; the API's no-op tracer while tracing is off."""
    return _tracer


def end(span: trace.Span) -> None:
    """Ends a span unless it already ended (a request's queue span ends at whichever comes first)."""
    if span.is_recording():
        span.end()


def shutdown() -> None:
    """Flushes what is still buffered (the SDK also does this at exit)."""
    if _provider is not None:
        _provider.shutdown()


def server_interceptors(service: str) -> list[grpc.aio.ServerInterceptor]:
    """What `start_server(interceptors=...)` needs for tracing: nothing while tracing is off."""
    return [] if _provider is None else [ServerTracing(service)]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """OpenTelemetry's own aio client interceptors: a CLIENT span per attempt and `traceparent` in its metadata."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors
    from opentelemetry.instrumentation.grpc import filters as grpc_filters

    untraced = grpc_filters.any_of(*(grpc_filters.service_prefix(name) for name in UNTRACED_SERVICES))

    def traced(details: Any) -> bool:
        # Checked per call, so a channel made while tracing was on goes quiet once it is turned off (tests).
        return _provider is not None and not untraced(details)

    interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(  # type: ignore[no-untyped-call]
        tracer_provider=_provider, filter_=traced
    )
    return interceptors


def _request_attributes(request: Any) -> dict[str, Any]:
    """The model a request names and how many inputs it carries, for any stage's request message."""
    attributes: dict[str, Any] = {}
    model = getattr(request, "model", None)
    if isinstance(model, str) and model:
        attributes[MODEL_ATTRIBUTE] = model
    for field in ("inputs", "documents", "texts"):
        values = getattr(request, field, None)
        if values is not None and not isinstance(values, str):
            attributes[INPUTS_ATTRIBUTE] = len(values)
            break
    return attributes


class ServerTracing(grpc.aio.ServerInterceptor):
    """A SERVER span per call that continues the caller's W3C trace context from its metadata.

    Ours rather than opentelemetry-instrumentation-grpc's: it sits outside the error table, so it reads the code
    the table aborted with from the context, and it records what the table sets (the request id) and what the
    request names (model, inputs). Unary, server-streaming (generation) and stream-stream calls.
    """

    def __init__(self, service: str) -> None:
        self.service = service
        # Per method: the span attributes every call of it carries, or None for an untraced method.
        self._attributes: dict[str, dict[str, Any] | None] = {}

    def _method_attributes(self, method: str) -> dict[str, Any] | None:
        name = method.lstrip("/")
        if name.startswith(UNTRACED_SERVICES):
            return None
        service_name, _, rpc = name.partition("/")
        return {"rpc.system": "grpc", "rpc.service": service_name, "rpc.method": rpc, SERVICE_ATTRIBUTE: self.service}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if method in self._attributes:
            base = self._attributes[method]
        else:  # only methods with a handler get here, so the table is bounded by the services served
            base = self._attributes[method] = self._method_attributes(method)
        if base is None:
            return handler
        carrier = {k: v for k, v in handler_call_details.invocation_metadata or () if isinstance(v, str)}
        service = self.service

        def start(request: Any = None) -> tuple[trace.Span, contextvars.Token[str | None]]:
            token = _service.set(service)
            span = tracer().start_span(
                method,
                context=propagate.extract(carrier),
                kind=SpanKind.SERVER,
                attributes={**base, **_request_attributes(request)},
            )
            return span, token

        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                span, token = start(request)
                failure: BaseException | None = None
                try:
                    with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                        return await inner(request, context)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    _finish(span, context, failure)
                    _service.reset(token)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream is not None:
            inner_ss: Any = handler.stream_stream

            async def stream_stream(request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                span, token = start()
                failure: BaseException | None = None
                try:
                    with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                        async with contextlib.aclosing(inner_ss(request_iterator, context)) as responses:
                            async for response in responses:
                                yield response
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    _finish(span, context, failure)
                    # A stream closed from elsewhere finishes in another context, where the token does not apply.
                    with contextlib.suppress(ValueError):
                        _service.reset(token)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            # (A coroutine that writes with context.write, like grpc's health Watch, is left untraced.)
            inner_us: Any = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                span, token = start(request)
                failure: BaseException | None = None
                try:
                    with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                        async with contextlib.aclosing(inner_us(request, context)) as responses:
                            async for response in responses:
                                yield response
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    _finish(span, context, failure)
                    with contextlib.suppress(ValueError):
                        _service.reset(token)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


def _finish(span: trace.Span, context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None) -> None:
    """Ends a call's span with its request id and the status code the error table set (or the reason it broke off)."""
    rid = request_id.get()
    if rid != "-":
        span.set_attribute(REQUEST_ID_ATTRIBUTE, rid)
    code = context.code()
    if code is None and exc is not None:  # not aborted by the error table: the caller went away
        code = grpc.StatusCode.CANCELLED if isinstance(exc, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN
    if code is not None and code != grpc.StatusCode.OK:
        span.set_attribute(GRPC_STATUS_ATTRIBUTE, code.value[0])
        details = context.details()
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}" if details else code.name))
    else:
        span.set_attribute(GRPC_STATUS_ATTRIBUTE, grpc.StatusCode.OK.value[0])
    span.end()
