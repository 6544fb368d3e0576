"""Extra gateways over the session stack's stages, each with its own pipeline limits, interceptors and options."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.clients import InferenceClient, PostprocessClient, TokenizerClient
from gateway.core import Pipeline
from gateway.management.client import ManagementClient
from gateway.management.servicer import registrar as management_registrar
from gateway.oip.servicer import registrar as oip_registrar
from gateway.servicer import registrar as gateway_registrar
from services.common.server import RunningServer, start_server
from tandem.management.v1 import management_pb2, management_pb2_grpc
from tests.conftest import Stack

MiB = 1024 * 1024


class FakeManagement(management_pb2_grpc.ManagementServiceServicer):
    """Stands in for the inference stage's ManagementService: the gateway only forwards, so any answer will do."""

    async def ListModels(  # noqa: N802
        self, request: management_pb2.ListModelsRequest, context: Any
    ) -> management_pb2.ListModelsResponse:
        return management_pb2.ListModelsResponse()


@dataclass
class Gateway:
    server: RunningServer
    pipeline: Pipeline
    channel: grpc.aio.Channel


@contextlib.asynccontextmanager
async def gateway_over(
    stack: Stack,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    options: Sequence[tuple[str, Any]] = (),
    **pipeline_options: Any,
) -> AsyncIterator[Gateway]:
    """A gateway serving the native API, the OIP and management (forwarded to a fake) over the stack's stages."""
    fake = await start_server(
        "127.0.0.1:0",
        [
            (
                lambda server: management_pb2_grpc.add_ManagementServiceServicer_to_server(FakeManagement(), server),
                "tandem.management.v1.ManagementService",
            )
        ],
    )
    pipeline = Pipeline(
        TokenizerClient(stack.stages["tokenizer"].address, 64 * MiB),
        InferenceClient(stack.stages["inference"].address, 64 * MiB),
        PostprocessClient(stack.stages["postprocess"].address, 64 * MiB),
        **pipeline_options,
    )
    management = ManagementClient(fake.address, 64 * MiB)
    server = await start_server(
        "127.0.0.1:0",
        [gateway_registrar(pipeline), oip_registrar(pipeline), management_registrar(management)],
        max_connection_age_s=None,
        interceptors=interceptors,
        options=options,
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield Gateway(server, pipeline, channel)
    finally:
        await server.stop(0)
        await pipeline.close()
        await management.close()
        await fake.stop(0)
