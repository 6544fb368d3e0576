"""The wrappers of streaming handlers (the server interceptors', the gateway's) close the handler they wrap when they
are closed.

grpc leaves a streaming handler's generator unfinished when its call ends between two answers (the caller went away
while an answer was being sent); the generator is then closed from outside (aclose, or the event loop's finalizer),
which stops the outermost wrapper at its `yield`. The handler inside must be closed then too, not on some later turn of
the event loop when its own generator is collected: its `finally` blocks are what cancel the work (a generation
sequence in the engine, the requests of a multiplexed stream).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from gateway.interception import wrap_handler
from services.common import errors, tracing
from services.common.metrics import MetricsInterceptor, ServiceMetrics
from services.common.server import ErrorInterceptor
from services.inference.servicer import InferenceServicer
from tandem.inference.v1 import inference_pb2

Handler = Any  # grpc.RpcMethodHandler
Wrap = Callable[[Handler], Awaitable[Handler]]


class _Context:
    """What the wrappers read of a grpc.aio.ServicerContext while a stream is open."""

    def __init__(self) -> None:
        self._trailers: tuple[tuple[str, str], ...] = ()

    def code(self) -> grpc.StatusCode | None:
        return None

    def details(self) -> str | None:
        return None

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self._trailers = trailers

    async def send_initial_metadata(self, metadata: Any) -> None:
        return None


class _Details(grpc.HandlerCallDetails):
    method = "/tandem.test.v1.TestService/Stream"
    invocation_metadata = (("x-request-id", "wrapped-stream"),)


def _by(interceptor: grpc.aio.ServerInterceptor) -> Wrap:
    async def wrap(handler: Handler) -> Handler:
        async def continuation(details: grpc.HandlerCallDetails) -> Handler:
            return handler

        return await interceptor.intercept_service(continuation, _Details())

    return wrap


async def _nothing(request: Any, context: Any) -> None:
    return None


async def _by_gateway_wrapper(handler: Handler) -> Handler:
    return wrap_handler(handler, _nothing)


WRAPPERS: dict[str, Callable[[], Wrap]] = {
    "metrics": lambda: _by(MetricsInterceptor(ServiceMetrics("test", CollectorRegistry()))),
    "error table": lambda: _by(ErrorInterceptor()),
    "tracing": lambda: _by(tracing.ServerTracing("test")),
    "gateway's (auth, priority, rate limits)": lambda: _by_gateway_wrapper,
}


async def _no_requests() -> AsyncIterator[Any]:
    return
    yield


@pytest.mark.parametrize("kind", ["unary_stream", "stream_stream"])
@pytest.mark.parametrize("wrapper", WRAPPERS)
async def test_closing_the_wrapper_closes_the_handler_inside_at_once(kind: str, wrapper: str) -> None:
    closed: list[str] = []

    async def answers(request_or_requests: Any, context: Any) -> AsyncIterator[str]:
        """The handler for either kind: both take (the request or the requests' iterator, the context)."""
        try:
            for i in range(10):
                yield f"answer {i}"
                await asyncio.sleep(0)
        finally:
            closed.append("handler")

    if kind == "unary_stream":
        wrapped = await WRAPPERS[wrapper]()(grpc.unary_stream_rpc_method_handler(answers))
        stream = wrapped.unary_stream(object(), _Context())
    else:
        wrapped = await WRAPPERS[wrapper]()(grpc.stream_stream_rpc_method_handler(answers))
        stream = wrapped.stream_stream(_no_requests(), _Context())
    previous = tracing.install(tracing.provider_for("tandem-test", []))
    try:
        assert await anext(stream) == "answer 0"
        await stream.aclose()
    finally:
        tracing.install(previous)
    assert closed == ["handler"], f"{wrapper}: the handler was left open after its wrapper closed"


class _BlockingCore:
    """An inference core whose model "fail" fails at once and whose model "block" runs until cancelled."""

    def __init__(self) -> None:
        self.draining = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = False

    async def infer(self, model: str, *args: Any, **kwargs: Any) -> Any:
        if model == "fail":
            raise errors.not_found(f"model {model} is not served", model=model)
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def test_closing_an_infer_stream_cancels_its_requests_still_running_at_once() -> None:
    core = _BlockingCore()

    async def requests() -> AsyncIterator[inference_pb2.InferStreamRequest]:
        yield inference_pb2.InferStreamRequest(id=1, request=inference_pb2.InferRequest(model="fail"))
        yield inference_pb2.InferStreamRequest(id=2, request=inference_pb2.InferRequest(model="block"))
        await asyncio.Event().wait()  # the caller keeps its side open

    stream = InferenceServicer(core).InferStream(requests(), None)  # type: ignore[arg-type]
    first = await asyncio.wait_for(anext(stream), 5)
    assert first.id == 1 and first.status
    await asyncio.wait_for(core.started.wait(), 5)
    await stream.aclose()  # type: ignore[attr-defined]
    assert core.cancelled
