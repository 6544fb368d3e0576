"""Wrapping gRPC method handlers of every kind, for the gateway's server interceptors (authentication, rate limits).

A `grpc.aio.ServerInterceptor` sees only the method name and metadata; to act on the request, or inside the call's
task (where context variables reach the servicer), it returns a wrapped handler. These interceptors sit outside the
error table, so they turn their own domain errors into rich statuses with `abort_with`.
"""

from __future__ import annotations

import contextlib
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


def _wrapped(inner: Any, before: Before, on_message: OnMessage | None, request_streaming: bool) -> Any:
    """`inner` with `before` run first; the same code serves all four kinds, since grpc allows each behaviour as a
    coroutine, and a response-streaming one also as an async generator."""

    async def start(arg: Any, context: Context) -> Any:
        try:
            await before(None if request_streaming else arg, context)
        except errors.TandemError as err:
            await abort_with(context, err)
        return _each(arg, context, on_message) if request_streaming else arg

    if inspect.isasyncgenfunction(inner):

        async def generator(arg: Any, context: Context) -> AsyncIterator[Any]:
            # Closed with this one (services.common.server's wrappers say why).
            async with contextlib.aclosing(inner(await start(arg, context), context)) as responses:
                async for response in responses:
                    yield response

        return generator

    async def coroutine(arg: Any, context: Context) -> Any:
        return await inner(await start(arg, context), context)

    return coroutine


def _each(request_iterator: AsyncIterator[Any], context: Context, on_message: OnMessage | None) -> Any:
    if on_message is None:
        return request_iterator

    async def messages() -> AsyncIterator[Any]:
        async for message in request_iterator:
            await on_message(message, context)
            yield message

    return messages()


def wrap_handler(handler: Handler, before: Before, on_message: OnMessage | None = None) -> Handler:
    """The same handler with `before` run at the start of each call and `on_message` on each streamed request."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_wrapped(handler.unary_unary, before, None, False), des, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_wrapped(handler.unary_stream, before, None, False), des, ser)
    if handler.stream_unary is not None:
        behaviour = _wrapped(handler.stream_unary, before, on_message, True)
        return grpc.stream_unary_rpc_method_handler(behaviour, des, ser)
    if handler.stream_stream is not None:
        behaviour = _wrapped(handler.stream_stream, before, on_message, True)
        return grpc.stream_stream_rpc_method_handler(behaviour, des, ser)
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
