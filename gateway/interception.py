"""Wrapping gRPC method handlers of every kind, for the gateway's server interceptors (authentication, rate limits).

A `grpc.aio.ServerInterceptor` sees only the method name and metadata; to act on the request, or inside the call's
task (where context variables reach the servicer), it returns a wrapped handler. These interceptors sit outside the
error table, so they turn their own domain errors into rich statuses with `abort_with`.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from services.common import errors
from services.common.server import abort_with

Context = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only to type checkers
# Runs once as the call starts: with the request for a unary request, None for a streaming one.
Before = Callable[[Any, Context], Awaitable[None]]
# Runs for each message of a streaming request, before the servicer sees it.
OnMessage = Callable[[Any, Context], Awaitable[None]]


async def _start(before: Before, request: Any, context: Context) -> None:
    try:
        await before(request, context)
    except errors.TandemError as err:
        await abort_with(context, err)


def _each(request_iterator: AsyncIterator[Any], context: Context, on_message: OnMessage | None) -> Any:
    if on_message is None:
        return request_iterator

    async def messages() -> AsyncIterator[Any]:
        async for message in request_iterator:
            await on_message(message, context)
            yield message

    return messages()


def _streaming_response(inner: Any, make_args: Callable[[Any], Any], prelude: Callable[..., Awaitable[None]]) -> Any:
    """Wraps a response-streaming behaviour, which grpc allows as an async generator or as a coroutine."""
    if inspect.isasyncgenfunction(inner):

        async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
            await prelude(request, context)
            async for response in inner(make_args(request), context):
                yield response

        return generator

    async def coroutine(request: Any, context: Context) -> Any:
        await prelude(request, context)
        return await inner(make_args(request), context)

    return coroutine


def wrap_handler(handler: Handler, before: Before, on_message: OnMessage | None = None) -> Handler:
    """The same handler with `before` run at the start of each call and `on_message` on each streamed request."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        inner_uu: Any = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            await _start(before, request, context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)
    if handler.unary_stream is not None:
        behaviour = _streaming_response(
            handler.unary_stream, lambda request: request, lambda request, context: _start(before, request, context)
        )
        return grpc.unary_stream_rpc_method_handler(behaviour, des, ser)
    if handler.stream_unary is not None:
        inner_su: Any = handler.stream_unary

        async def stream_unary(request_iterator: Any, context: Context) -> Any:
            await _start(before, None, context)
            return await inner_su(_each(request_iterator, context, on_message), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, des, ser)
    if handler.stream_stream is not None:
        # The request iterator needs the context to wrap it, so the arguments are rebuilt inside the behaviour.
        inner_ss: Any = handler.stream_stream

        if inspect.isasyncgenfunction(inner_ss):

            async def stream_stream_gen(request_iterator: Any, context: Context) -> AsyncIterator[Any]:
                await _start(before, None, context)
                async for response in inner_ss(_each(request_iterator, context, on_message), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(stream_stream_gen, des, ser)

        async def stream_stream(request_iterator: Any, context: Context) -> Any:
            await _start(before, None, context)
            return await inner_ss(_each(request_iterator, context, on_message), context)

        return grpc.stream_stream_rpc_method_handler(stream_stream, des, ser)
    return handler


def rejecting_handler(handler: Handler, err: errors.TandemError) -> Handler:
    """A handler of the same kind that answers `err` without reading (or parsing) the request."""

    async def reject(request: Any, context: Context) -> None:
        await abort_with(context, err)

    # No deserializer: a refused caller's bytes are never parsed.
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(reject)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(reject)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(reject)
    return grpc.stream_stream_rpc_method_handler(reject)
