"""Typed client of the inference stage's ManagementService: the caller's deadline, the stage's status kept."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.clients import StageClient
from tandem.management.v1 import management_pb2, management_pb2_grpc

SERVICE_NAME = "tandem.management.v1.ManagementService"


@dataclass(frozen=True)
class RegistryVersion:
    """One version as the registry sees it; `state` is LOADING, READY, FAILED, UNLOADING or UNLOADED."""

    name: str
    version: str
    state: str
    reason: str


def _state_name(state: int) -> str:
    return management_pb2.VersionState.Name(state).removeprefix("VERSION_STATE_")  # type: ignore[arg-type]


class ManagementClient(StageClient["management_pb2_grpc.ManagementServiceAsyncStub"]):
    """A channel of its own to the inference stage (every call is idempotent, so StageClient's retries on
    UNAVAILABLE and CANCELLED apply). Behind a round-robin target one replica answers each call: aliases reach the
    others through the repository (aliases.json, read every second); loads and unloads stay with the replica."""

    stage = "inference"
    stub_type = management_pb2_grpc.ManagementServiceStub

    async def list_models(
        self, request: management_pb2.ListModelsRequest, deadline: float
    ) -> management_pb2.ListModelsResponse:
        return await self.call(self._stub.ListModels, request, deadline)

    async def load_model(
        self, request: management_pb2.LoadModelRequest, deadline: float
    ) -> management_pb2.LoadModelResponse:
        return await self.call(self._stub.LoadModel, request, deadline)

    async def unload_model(
        self, request: management_pb2.UnloadModelRequest, deadline: float
    ) -> management_pb2.UnloadModelResponse:
        return await self.call(self._stub.UnloadModel, request, deadline)

    async def set_alias(
        self, request: management_pb2.SetAliasRequest, deadline: float
    ) -> management_pb2.SetAliasResponse:
        return await self.call(self._stub.SetAlias, request, deadline)

    async def delete_alias(
        self, request: management_pb2.DeleteAliasRequest, deadline: float
    ) -> management_pb2.DeleteAliasResponse:
        return await self.call(self._stub.DeleteAlias, request, deadline)

    async def reload_model(
        self, request: management_pb2.ReloadModelRequest, deadline: float
    ) -> management_pb2.ReloadModelResponse:
        return await self.call(self._stub.ReloadModel, request, deadline)

    async def versions(self, deadline: float) -> list[RegistryVersion]:
        """Every version of every model, with its lifecycle state (models without versions are left out)."""
        reply = await self.list_models(management_pb2.ListModelsRequest(), deadline)
        return [
            RegistryVersion(model.name, v.version, _state_name(v.state), v.reason or model.reason)
            for model in reply.models
            for v in model.versions
        ]

    async def load(self, name: str, deadline: float) -> None:
        """Loads what the model's version policy wants (undoing an earlier unload); returns once it is ready."""
        await self.load_model(management_pb2.LoadModelRequest(name=name, wait=True), deadline)

    async def unload(self, name: str, deadline: float) -> None:
        """Unloads every version of the model once its in-flight requests are done; returns when it is unloaded."""
        await self.unload_model(management_pb2.UnloadModelRequest(name=name, wait=True), deadline)
