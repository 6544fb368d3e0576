"""gRPC servicer of the public GatewayService: convert, await the pipeline, convert back."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from gateway import converters
from gateway.core import Pipeline
from gateway.streams import ordered
from services.common import errors
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def _flag(request: Any, name: str, default: bool) -> bool:
    return bool(getattr(request, name)) if request.HasField(name) else default


def _embed_options(request: gateway_pb2.EmbedRequest) -> dict[str, Any]:
    return {
        "dimensions": request.dimensions if request.HasField("dimensions") else None,
        "force_dimensions": request.force_dimensions,
        "prompt_name": request.prompt_name,
    }


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, pipeline: Pipeline, stream_window: int = 64) -> None:
        self.pipeline = pipeline
        self.stream_window = stream_window

    async def Embed(self, request: gateway_pb2.EmbedRequest, context: Context) -> gateway_pb2.EmbedResponse:  # noqa: N802
        result = await self.pipeline.embed(
            request.model,
            request.inputs,
            _flag(request, "normalize", True),
            _flag(request, "truncate", True),
            self.pipeline.deadline(context.time_remaining()),
            **_embed_options(request),
        )
        return converters.embed_response(result)

    async def EmbedStream(  # noqa: N802
        self, request_iterator: AsyncIterator[gateway_pb2.EmbedStreamRequest], context: Context
    ) -> AsyncIterator[gateway_pb2.EmbedStreamResponse]:
        stream_deadline = context.time_remaining()

        async def handle(item: gateway_pb2.EmbedStreamRequest) -> gateway_pb2.EmbedResponse:
            request = item.request
            result = await self.pipeline.embed(
                request.model,
                request.inputs,
                _flag(request, "normalize", True),
                _flag(request, "truncate", True),
                self.pipeline.deadline(None if stream_deadline is None else context.time_remaining()),
                **_embed_options(request),
            )
            return converters.embed_response(result)

        # Closing the stream cancels the requests still running at once.
        async with contextlib.aclosing(ordered(request_iterator, handle, self.stream_window)) as outcomes:
            async for item, outcome in outcomes:
                if isinstance(outcome, errors.TandemError):
                    yield gateway_pb2.EmbedStreamResponse(id=item.id, error=converters.stream_error(outcome))
                else:
                    yield gateway_pb2.EmbedStreamResponse(id=item.id, response=outcome)

    async def Classify(  # noqa: N802
        self, request: gateway_pb2.ClassifyRequest, context: Context
    ) -> gateway_pb2.ClassifyResponse:
        result = await self.pipeline.classify(
            request.model,
            request.inputs,
            request.top_k,
            _flag(request, "truncate", True),
            self.pipeline.deadline(context.time_remaining()),
        )
        return converters.classify_response(result)

    async def ClassifyTokens(  # noqa: N802
        self, request: gateway_pb2.ClassifyTokensRequest, context: Context
    ) -> gateway_pb2.ClassifyTokensResponse:
        result = await self.pipeline.classify_tokens(
            request.model,
            request.inputs,
            _flag(request, "truncate", True),
            self.pipeline.deadline(context.time_remaining()),
        )
        return converters.classify_tokens_response(result)

    async def Rerank(self, request: gateway_pb2.RerankRequest, context: Context) -> gateway_pb2.RerankResponse:  # noqa: N802
        result = await self.pipeline.rerank(
            request.model,
            request.query,
            request.documents,
            request.top_n,
            _flag(request, "truncate", True),
            self.pipeline.deadline(context.time_remaining()),
        )
        return converters.rerank_response(result, list(request.documents), request.return_documents)

    async def Tokenize(  # noqa: N802
        self, request: gateway_pb2.TokenizeRequest, context: Context
    ) -> gateway_pb2.TokenizeResponse:
        result = await self.pipeline.tokenize(
            request.model,
            request.inputs,
            _flag(request, "add_special_tokens", True),
            _flag(request, "truncate", True),
            self.pipeline.deadline(context.time_remaining()),
        )
        return converters.tokenize_response(result)

    async def Detokenize(  # noqa: N802
        self, request: gateway_pb2.DetokenizeRequest, context: Context
    ) -> gateway_pb2.DetokenizeResponse:
        reply = await self.pipeline.detokenize(
            request.model,
            request.ids,
            _flag(request, "skip_special_tokens", True),
            self.pipeline.deadline(context.time_remaining()),
        )
        return gateway_pb2.DetokenizeResponse(text=reply.text, model=reply.model)

    async def ListModels(  # noqa: N802
        self, request: gateway_pb2.ListModelsRequest, context: Context
    ) -> gateway_pb2.ListModelsResponse:
        models = await self.pipeline.list_models(self.pipeline.deadline(context.time_remaining()))
        return gateway_pb2.ListModelsResponse(models=models)

    async def GetModel(  # noqa: N802
        self, request: gateway_pb2.GetModelRequest, context: Context
    ) -> gateway_pb2.GetModelResponse:
        model = await self.pipeline.get_model(request.model, self.pipeline.deadline(context.time_remaining()))
        return gateway_pb2.GetModelResponse(model=model)

    async def Generate(  # noqa: N802
        self, request: gateway_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        stream = self.pipeline.generate(
            request.model,
            request.prompt,
            converters.chat_messages(request),
            request.params,
            self.pipeline.deadline(context.time_remaining()),
        )
        async with contextlib.aclosing(stream):
            async for message in stream:
                yield converters.generate_response(message)


SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


def registrar(pipeline: Pipeline, stream_window: int = 64) -> tuple[Any, str]:
    servicer = GatewayServicer(pipeline, stream_window)
    return (lambda server: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)), SERVICE_NAME
