"""gRPC servicer of tandem.management.v1.ManagementService on the gateway: applies each call to every inference
replica (gateway.management.client)."""

from __future__ import annotations

import time
from typing import Any

import grpc

from gateway.management.client import SERVICE_NAME, ManagementClient
from tandem.management.v1 import management_pb2, management_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class ManagementForwarder(management_pb2_grpc.ManagementServiceServicer):
    """The same messages in and out, merged over the replicas; a replica's error reaches the caller with its own code
    and details, and one that failed on some replicas only says which (see ManagementClient)."""

    def __init__(self, client: ManagementClient, default_timeout_s: float) -> None:
        self.client = client
        self.default_timeout_s = default_timeout_s

    def _deadline(self, context: Context) -> float:
        remaining = context.time_remaining()
        return time.monotonic() + (self.default_timeout_s if remaining is None else remaining)

    async def ListModels(  # noqa: N802
        self, request: management_pb2.ListModelsRequest, context: Context
    ) -> management_pb2.ListModelsResponse:
        return await self.client.list_models(request, self._deadline(context))

    async def LoadModel(  # noqa: N802
        self, request: management_pb2.LoadModelRequest, context: Context
    ) -> management_pb2.LoadModelResponse:
        return await self.client.load_model(request, self._deadline(context))

    async def UnloadModel(  # noqa: N802
        self, request: management_pb2.UnloadModelRequest, context: Context
    ) -> management_pb2.UnloadModelResponse:
        return await self.client.unload_model(request, self._deadline(context))

    async def SetAlias(  # noqa: N802
        self, request: management_pb2.SetAliasRequest, context: Context
    ) -> management_pb2.SetAliasResponse:
        return await self.client.set_alias(request, self._deadline(context))

    async def DeleteAlias(  # noqa: N802
        self, request: management_pb2.DeleteAliasRequest, context: Context
    ) -> management_pb2.DeleteAliasResponse:
        return await self.client.delete_alias(request, self._deadline(context))

    async def ReloadModel(  # noqa: N802
        self, request: management_pb2.ReloadModelRequest, context: Context
    ) -> management_pb2.ReloadModelResponse:
        return await self.client.reload_model(request, self._deadline(context))


def registrar(client: ManagementClient, default_timeout_s: float = 600.0) -> tuple[Any, str]:
    servicer = ManagementForwarder(client, default_timeout_s)
    return (lambda server: management_pb2_grpc.add_ManagementServiceServicer_to_server(servicer, server)), SERVICE_NAME
