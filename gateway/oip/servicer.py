"""gRPC servicer of inference.GRPCInferenceService (Open Inference Protocol): convert, await the data plane, convert."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc

from gateway.core import Pipeline
from gateway.oip import converters
from gateway.oip.dataplane import DataPlane
from gateway.oip.models import ModelRegistry
from gateway.streams import interleaved
from services.common import errors
from services.common.server import Undecodable
from tandem.oip.v2 import grpc_service_pb2 as pb
from tandem.oip.v2 import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class InferenceProtocolServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:  # noqa: N802
        ready = await self.plane.ready(self.plane.deadline(context.time_remaining()))
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:  # noqa: N802
        deadline = self.plane.deadline(context.time_remaining())
        return pb.ModelReadyResponse(ready=await self.plane.model_ready(request.name, request.version, deadline))

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return converters.server_metadata_response(self.plane.metadata)

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        deadline = self.plane.deadline(context.time_remaining())
        metadata = await self.plane.model_metadata(request.name, request.version, deadline)
        return converters.model_metadata_response(metadata)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:  # noqa: N802
        call = converters.infer_call(request)
        result = await self.plane.infer(call, self.plane.deadline(context.time_remaining()))
        return converters.infer_response(result)

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.ModelInferRequest | Undecodable], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently and are answered as they finish (a streamed generation as its text comes); a
        failure is answered, the stream goes on, also for a message that does not parse (it has no id to answer
        with: its error response has an empty one). A caller that goes away cancels every request still running."""

        async def answer(
            request: pb.ModelInferRequest | Undecodable,
        ) -> AsyncGenerator[pb.ModelStreamInferResponse, None]:
            if isinstance(request, Undecodable):  # answered in its place; the requests around it go on
                yield converters.stream_error(pb.ModelInferRequest(), request.to_error())
                return
            try:
                call = converters.infer_call(request)
                deadline = self.plane.deadline(context.time_remaining())
                async with contextlib.aclosing(self.plane.infer_stream(call, deadline)) as results:
                    async for result in results:
                        yield converters.stream_response(result)
            except errors.TandemError as err:
                yield converters.stream_error(request, err)
            except Exception:
                log.exception("unexpected error in ModelStreamInfer (request id %r)", request.id)
                yield converters.stream_error(request, errors.internal())

        responses = interleaved(request_iterator, answer, self.plane.max_stream_in_flight)
        async with contextlib.aclosing(responses):  # closing the stream closes every request's answers at once
            async for response in responses:
                yield response

    async def ModelStatistics(  # noqa: N802
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        deadline = self.plane.deadline(context.time_remaining())
        stats = await self.plane.model_statistics(request.name, request.version, deadline)
        return converters.model_statistics_response(stats)

    async def RepositoryIndex(  # noqa: N802
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        entries = await self.plane.repository_index(request.ready, self.plane.deadline(context.time_remaining()))
        return converters.repository_index_response(entries)

    async def RepositoryModelLoad(  # noqa: N802
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        parameters = converters.repository_parameters(request.parameters)
        await self.plane.load(request.model_name, parameters, self.plane.deadline(context.time_remaining()))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(  # noqa: N802
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        parameters = converters.repository_parameters(request.parameters)
        await self.plane.unload(request.model_name, parameters, self.plane.deadline(context.time_remaining()))
        return pb.RepositoryModelUnloadResponse()


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def registrar(pipeline: Pipeline, registry: ModelRegistry) -> tuple[Any, str]:
    """Registers the protocol over the gateway's pipeline, beside the native GatewayService; RepositoryModelLoad,
    RepositoryModelUnload and RepositoryIndex go to the model registry (the management client)."""
    servicer = InferenceProtocolServicer(DataPlane(pipeline, registry))
    return (lambda server: pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)), SERVICE_NAME
