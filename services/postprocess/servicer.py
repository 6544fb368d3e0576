"""gRPC servicer of the postprocess stage: convert, await the core, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.common import errors
from services.postprocess import converters
from services.postprocess.core import Postprocessor
from tandem.postprocess.v1 import postprocess_pb2, postprocess_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class PostprocessServicer(postprocess_pb2_grpc.PostprocessServiceServicer):
    def __init__(self, core: Postprocessor) -> None:
        self.core = core

    async def Pool(  # noqa: N802
        self, request: postprocess_pb2.PoolRequest, context: Context
    ) -> postprocess_pb2.PoolResponse:
        # Rows the inference stage already pooled (InferResponse.pooled) are only checked and normalized here.
        pooled = request.HasField("pooled_embeddings")
        if pooled and request.HasField("token_embeddings"):
            raise errors.invalid_argument("set token_embeddings or pooled_embeddings, not both", "pooled_embeddings")
        field = "pooled_embeddings" if pooled else "token_embeddings"
        embeddings = await (self.core.finish_pooled if pooled else self.core.pool)(
            request.model,
            request.version,
            converters.floats(request, field, field),
            converters.int32s(request, "cu_seqlens", "cu_seqlens", ndim=1),
            request.normalize,
            request.dimensions,
        )
        return converters.pool_response(embeddings)

    async def Classify(  # noqa: N802
        self, request: postprocess_pb2.ClassifyRequest, context: Context
    ) -> postprocess_pb2.ClassifyResponse:
        results = await self.core.classify(
            request.model, request.version, converters.floats(request, "logits", "logits"), request.top_k
        )
        return converters.classify_response(results)

    async def ClassifyTokens(  # noqa: N802
        self, request: postprocess_pb2.ClassifyTokensRequest, context: Context
    ) -> postprocess_pb2.ClassifyTokensResponse:
        batch = request.batch
        results = await self.core.classify_tokens(
            request.model,
            request.version,
            converters.floats(request, "logits", "logits"),
            converters.int32s(batch, "cu_seqlens", "batch.cu_seqlens", ndim=1),
            converters.int32s(batch, "offsets", "batch.offsets", ndim=2),
            converters.mask(batch, "special_tokens_mask", "batch.special_tokens_mask"),
            request.texts,
        )
        return converters.classify_tokens_response(results)

    async def Rerank(  # noqa: N802
        self, request: postprocess_pb2.RerankRequest, context: Context
    ) -> postprocess_pb2.RerankResponse:
        results = await self.core.rerank(
            request.model, request.version, converters.floats(request, "logits", "logits"), request.top_n
        )
        return converters.rerank_response(results)

    async def Detokenize(  # noqa: N802
        self, request_iterator: AsyncIterator[postprocess_pb2.DetokenizeRequest], context: Context
    ) -> AsyncIterator[postprocess_pb2.DetokenizeResponse]:
        decoding = None
        async for request in request_iterator:
            if decoding is None:
                decoding = await self.core.detokenization(
                    request.model,
                    request.version,
                    list(request.prompt_ids),
                    list(request.stop),
                    not request.keep_special_tokens,
                )
            delta = decoding.feed(list(request.token_ids), request.finish)
            yield postprocess_pb2.DetokenizeResponse(
                text=delta.text, stop=delta.stop or "", stop_token_count=delta.stop_token_count or 0
            )


SERVICE_NAME = postprocess_pb2.DESCRIPTOR.services_by_name["PostprocessService"].full_name


def registrar(core: Postprocessor) -> tuple[Any, str]:
    servicer = PostprocessServicer(core)
    return (
        lambda server: postprocess_pb2_grpc.add_PostprocessServiceServicer_to_server(servicer, server)
    ), SERVICE_NAME
