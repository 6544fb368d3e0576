"""Management of every inference replica: each call goes to all of them at once, with the caller's deadline.

What a replica has loaded or unloaded lives in that replica's process, so a call that reached one replica (as
round_robin sends inference calls) would leave the others as they were, and requests would then succeed or fail by
the replica they land on. The gateway therefore resolves every replica behind its inference target (see
gateway.management.targets), keeps a channel to each, and applies LoadModel, UnloadModel, SetAlias, DeleteAlias and
ReloadModel to all of them concurrently. A call succeeds only when it succeeded on every replica; otherwise it fails
with the first failing replica's code and reason, the message and ErrorInfo metadata saying which replicas applied it
and which did not (every call is idempotent: sending it again is the way to converge). ListModels merges the
replicas' answers so that a disagreement shows (gateway.management.merge) and lists each replica's own answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

from gateway.clients import StageClient
from gateway.management import targets
from gateway.management.merge import merge_models, state_name
from gateway.management.targets import Replica
from services.common import errors
from services.common.tls import ChannelSecurity
from tandem.management.v1 import management_pb2, management_pb2_grpc

SERVICE_NAME = "tandem.management.v1.ManagementService"

Response = TypeVar("Response")
if TYPE_CHECKING:
    # Picks the RPC to call from a replica's stub.
    Pick = Callable[[management_pb2_grpc.ManagementServiceAsyncStub], Callable[..., Awaitable[Response]]]


@dataclass(frozen=True)
class RegistryVersion:
    """One version as the registry sees it; `state` is LOADING, READY, FAILED, UNLOADING, UNLOADED, or MIXED when
    the inference replicas disagree."""

    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True)
class ReplicaOutcome(Generic[Response]):
    """What one replica answered: its response, or its error."""

    address: str
    response: Response | None = None
    error: errors.TandemError | None = None


class ReplicaClient(StageClient["management_pb2_grpc.ManagementServiceAsyncStub"]):
    """One inference replica's ManagementService on a channel of its own (every call is idempotent, so StageClient's
    retries on UNAVAILABLE and CANCELLED apply; there is no other replica to hedge to)."""

    stage = "inference"
    stub_type = management_pb2_grpc.ManagementServiceStub

    async def send(self, pick: Pick[Response], request: Any, deadline: float) -> Response:
        return await self.call(pick(self._stub), request, deadline)


def _already_deleted(alias: str) -> Callable[[errors.TandemError], bool]:
    """DeleteAlias edits aliases.json, which replicas usually share: of replicas called together one deletes the alias
    and the others find it gone (NOT_FOUND naming the alias). Once one replica deleted it, that is what was asked."""

    def check(err: errors.TandemError) -> bool:
        return err.code == grpc.StatusCode.NOT_FOUND and err.metadata.get("alias") == alias

    return check


def _code_name(err: errors.TandemError) -> str:
    return str(err.code.name)


def replicas_error(
    action: str, outcomes: Sequence[ReplicaOutcome[Any]], failed: Sequence[ReplicaOutcome[Any]]
) -> errors.TandemError:
    """The error of a call that failed on some replicas: the first failure's status (code, reason, details), its
    message saying what happened where, and ErrorInfo metadata listing the replicas (`replicas`, `failed_replicas`,
    `applied_replicas`: comma-separated addresses)."""
    first = failed[0].error
    assert first is not None
    applied = [o.address for o in outcomes if o.error is None]
    status = status_pb2.Status()
    status.CopyFrom(first.to_status_proto())
    what = "; ".join(f"{o.address}: {_code_name(o.error)}: {o.error.message}" for o in failed if o.error is not None)
    status.message = f"{action} failed on {len(failed)} of {len(outcomes)} inference replicas ({what})"
    status.message += f"; applied on {', '.join(applied)}" if applied else ""
    metadata = {
        "replicas": ",".join(o.address for o in outcomes),
        "failed_replicas": ",".join(o.address for o in failed),
        "applied_replicas": ",".join(applied),
    }
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            info.metadata.update(metadata)
            detail.Pack(info)
            break
    else:
        info = error_details_pb2.ErrorInfo(reason=first.reason or "INTERNAL", domain=errors.DOMAIN, metadata=metadata)
        status.details.add().Pack(info)
    return errors.from_upstream(status)


def settle(
    action: str,
    outcomes: Sequence[ReplicaOutcome[Response]],
    *,
    every: bool = True,
    tolerated: Callable[[errors.TandemError], bool] | None = None,
) -> list[ReplicaOutcome[Response]]:
    """The replicas that answered, when enough did: every one (`every`) or at least one. A `tolerated` error counts
    as done once another replica succeeded. When no replica succeeded and all failed alike, that error is raised as
    the replica sent it (one replica behind the target behaves as the stage itself); otherwise `replicas_error`."""
    answered = [o for o in outcomes if o.error is None]
    failed = [o for o in outcomes if o.error is not None and not (answered and tolerated and tolerated(o.error))]
    if answered and (not failed or not every):
        return answered
    kinds = {(o.error.code, o.error.message) for o in failed if o.error is not None}
    if not answered and len(kinds) == 1 and failed[0].error is not None:
        raise failed[0].error
    raise replicas_error(action, outcomes, failed)


def results(
    outcomes: Sequence[ReplicaOutcome[Response]], models: Callable[[Response], Sequence[management_pb2.ModelStatus]]
) -> list[management_pb2.ReplicaResult]:
    """Each replica's answer as the responses' `replicas` field carries it."""
    out: list[management_pb2.ReplicaResult] = []
    for o in outcomes:
        if o.error is not None:
            out.append(
                management_pb2.ReplicaResult(address=o.address, code=o.error.code.value[0], message=o.error.message)
            )
        elif o.response is not None:
            out.append(management_pb2.ReplicaResult(address=o.address, models=models(o.response)))
    return out


def _merged_one(outcomes: Sequence[ReplicaOutcome[Any]]) -> management_pb2.ModelStatus:
    merged = merge_models([(o.address, [o.response.model]) for o in outcomes if o.response is not None])
    return merged[0] if merged else management_pb2.ModelStatus()


class ManagementClient:
    """The inference stage's ManagementService on every replica behind `target`.

    Replicas are resolved at each call (a `dns:` name is looked up again, so pods that came or went count); a
    channel is kept per replica address and closed once the address is gone.
    """

    def __init__(self, target: str, max_message_bytes: int, *, security: ChannelSecurity | None = None) -> None:
        self.target = target
        self.max_message_bytes = max_message_bytes
        self.security = security
        self._clients: dict[str, ReplicaClient] = {}
        self._in_use: Counter[str] = Counter()

    def _client(self, replica: Replica) -> ReplicaClient:
        client = self._clients.get(replica.target)
        if client is None:
            security = self.security
            if security is not None and security.server_name is None and replica.host:
                # The replica is dialled by address; its certificate names the DNS name the address came from.
                security = replace(security, server_name=replica.host)
            client = ReplicaClient(replica.target, self.max_message_bytes, security=security)
            self._clients[replica.target] = client
        return client

    async def _forget_others(self, replicas: Sequence[Replica]) -> None:
        """Closes the channels of addresses no longer resolved (once no call is using them)."""
        keep = {r.target for r in replicas}
        for gone in [t for t in self._clients if t not in keep and not self._in_use[t]]:
            await self._clients.pop(gone).close()

    async def fan_out(self, pick: Pick[Response], request: Any, deadline: float) -> list[ReplicaOutcome[Response]]:
        """Sends the call to every replica at once; each answer or error, in replica order."""
        replicas = await targets.resolve(self.target, deadline - time.monotonic())
        await self._forget_others(replicas)

        async def one(replica: Replica) -> ReplicaOutcome[Response]:
            client = self._client(replica)
            self._in_use[replica.target] += 1
            try:
                return ReplicaOutcome(replica.address, response=await client.send(pick, request, deadline))
            except errors.TandemError as err:
                return ReplicaOutcome(replica.address, error=err)
            finally:
                self._in_use[replica.target] -= 1

        return list(await asyncio.gather(*(one(r) for r in replicas)))

    async def list_models(
        self, request: management_pb2.ListModelsRequest, deadline: float
    ) -> management_pb2.ListModelsResponse:
        """Merged over the replicas that answered (at least one must); each replica's answer or error listed."""
        outcomes = await self.fan_out(lambda s: s.ListModels, request, deadline)
        answered = settle("ListModels", outcomes, every=False)
        return management_pb2.ListModelsResponse(
            models=merge_models([(o.address, o.response.models) for o in answered if o.response is not None]),
            replicas=results(outcomes, lambda r: r.models),
        )

    async def load_model(
        self, request: management_pb2.LoadModelRequest, deadline: float
    ) -> management_pb2.LoadModelResponse:
        outcomes = await self.fan_out(lambda s: s.LoadModel, request, deadline)
        done = settle("LoadModel", outcomes)
        return management_pb2.LoadModelResponse(
            model=_merged_one(done), replicas=results(outcomes, lambda r: [r.model])
        )

    async def unload_model(
        self, request: management_pb2.UnloadModelRequest, deadline: float
    ) -> management_pb2.UnloadModelResponse:
        outcomes = await self.fan_out(lambda s: s.UnloadModel, request, deadline)
        done = settle("UnloadModel", outcomes)
        return management_pb2.UnloadModelResponse(
            model=_merged_one(done), replicas=results(outcomes, lambda r: [r.model])
        )

    async def set_alias(
        self, request: management_pb2.SetAliasRequest, deadline: float
    ) -> management_pb2.SetAliasResponse:
        """Every replica loads and warms the version before the alias moves (each writes the same aliases.json)."""
        outcomes = await self.fan_out(lambda s: s.SetAlias, request, deadline)
        done = settle("SetAlias", outcomes)
        return management_pb2.SetAliasResponse(model=_merged_one(done), replicas=results(outcomes, lambda r: [r.model]))

    async def delete_alias(
        self, request: management_pb2.DeleteAliasRequest, deadline: float
    ) -> management_pb2.DeleteAliasResponse:
        outcomes = await self.fan_out(lambda s: s.DeleteAlias, request, deadline)
        done = settle("DeleteAlias", outcomes, tolerated=_already_deleted(request.alias))
        return management_pb2.DeleteAliasResponse(
            model=_merged_one(done), replicas=results(outcomes, lambda r: [r.model])
        )

    async def reload_model(
        self, request: management_pb2.ReloadModelRequest, deadline: float
    ) -> management_pb2.ReloadModelResponse:
        outcomes = await self.fan_out(lambda s: s.ReloadModel, request, deadline)
        done = settle("ReloadModel", outcomes)
        return management_pb2.ReloadModelResponse(
            models=merge_models([(o.address, o.response.models) for o in done if o.response is not None]),
            replicas=results(outcomes, lambda r: r.models),
        )

    async def versions(self, deadline: float) -> list[RegistryVersion]:
        """Every version of every model, with its lifecycle state (models without versions are left out)."""
        reply = await self.list_models(management_pb2.ListModelsRequest(), deadline)
        return [
            RegistryVersion(model.name, v.version, state_name(v.state), v.reason or model.reason)
            for model in reply.models
            for v in model.versions
        ]

    async def load(self, name: str, deadline: float) -> None:
        """Loads what the model's version policy wants (undoing an earlier unload) on every replica; returns once it
        is ready on all of them."""
        await self.load_model(management_pb2.LoadModelRequest(name=name, wait=True), deadline)

    async def unload(self, name: str, deadline: float) -> None:
        """Unloads every version of the model on every replica once its in-flight requests are done; returns when it
        is unloaded on all of them."""
        await self.unload_model(management_pb2.UnloadModelRequest(name=name, wait=True), deadline)

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()
