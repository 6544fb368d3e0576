"""Builds Tandem's services in this process, on port 0, wired as their __main__ modules wire them: whole stacks
(three stages and a gateway) for every test module that needs one, and extra gateways over a running stack's stages.

The inference stage serves InferenceService and ManagementService; the gateway serves what gateway/__main__.py
serves (gateway.__main__.services). Tests vary the settings (limits, interceptors, TLS), never the wiring.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from gateway.__main__ import services as gateway_services
from gateway.clients import InferenceClient, PostprocessClient, TokenizerClient
from gateway.core import Pipeline
from gateway.local import LocalPostprocess, LocalTokenizer
from gateway.management.client import ManagementClient
from services.common.repository import ModelRepository
from services.common.server import RunningServer, start_server
from services.common.tls import ChannelSecurity, secure_or_insecure_channel
from services.inference.core import Inference
from services.inference.servicer import management_registrar
from services.inference.servicer import registrar as inference_registrar
from services.postprocess.core import Postprocessor
from services.postprocess.servicer import registrar as postprocess_registrar
from services.tokenizer.core import Tokenizer
from services.tokenizer.servicer import registrar as tokenizer_registrar
from tandem.gateway.v1 import gateway_pb2_grpc
from tandem.inference.v1 import inference_pb2_grpc
from tandem.management.v1 import management_pb2, management_pb2_grpc
from tandem.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from tandem.tokenizer.v1 import tokenizer_pb2_grpc

MiB = 1024 * 1024

# The server interceptors of one service, by role ("gateway", "tokenizer", "inference", "postprocess").
Interceptors = Callable[[str], Sequence[grpc.aio.ServerInterceptor]]


def no_interceptors(role: str) -> Sequence[grpc.aio.ServerInterceptor]:
    return ()


@dataclass
class Stack:
    """Three stages and a gateway in this process; stubs on the gateway's channel and on the stages' own."""

    repository: Path
    core: Inference  # the inference stage's core, for tests that look inside
    stages: dict[str, RunningServer]  # by role; a test that restarts a stage puts the new server here
    pipeline: Pipeline
    gateway: RunningServer
    channel: grpc.aio.Channel  # to the gateway
    stage_channels: dict[str, grpc.aio.Channel]
    stub: gateway_pb2_grpc.GatewayServiceAsyncStub = field(init=False)
    oip: oip_grpc.GRPCInferenceServiceAsyncStub = field(init=False)
    management: management_pb2_grpc.ManagementServiceAsyncStub = field(init=False)  # on the gateway
    stage_management: management_pb2_grpc.ManagementServiceAsyncStub = field(init=False)  # on the inference stage
    inference: inference_pb2_grpc.InferenceServiceAsyncStub = field(init=False)
    tokenizer: tokenizer_pb2_grpc.TokenizerServiceAsyncStub = field(init=False)

    def __post_init__(self) -> None:
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.oip = oip_grpc.GRPCInferenceServiceStub(self.channel)
        self.management = management_pb2_grpc.ManagementServiceStub(self.channel)
        self.stage_management = management_pb2_grpc.ManagementServiceStub(self.stage_channels["inference"])
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.stage_channels["inference"])
        self.tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(self.stage_channels["tokenizer"])

    @property
    def servers(self) -> dict[str, RunningServer]:
        """All four servers by role."""
        return {"gateway": self.gateway, **self.stages}

    @property
    def addresses(self) -> dict[str, str]:
        return {role: server.address for role, server in self.servers.items()}


@contextlib.asynccontextmanager
async def serve_stack(
    repository: Path,
    home: Path,
    *,
    tokenizer_repository: Path | None = None,
    preload_tokenizer: bool = True,
    inference_options: Mapping[str, Any] | None = None,
    pipeline_options: Mapping[str, Any] | None = None,
    interceptors: Interceptors = no_interceptors,
    credentials: grpc.ServerCredentials | None = None,
    links: ChannelSecurity | None = None,
    tokenizer_listen: str = "127.0.0.1:0",
    gguf_cache: Path | None = None,
    in_process: bool = False,
    inference_listen: str = "127.0.0.1:0",
    inference_stream: bool = False,
) -> AsyncIterator[Stack]:
    """The three stages and a gateway over `repository`, the inference stage's exports and caches under `home`.

    `inference_options` and `pipeline_options` are more keywords for Inference (one model thread unless given) and
    for Pipeline; `interceptors` gives each server its interceptors by role; `credentials` serve TLS on every
    listener and `links` secure the gateway's (and the test's) channels, as `tandem serve --tls-*` does.
    `gguf_cache` is where GGUF models are converted to (default `home`/gguf), as `--gguf-cache` sets it.
    With `in_process`, the gateway answers tokenizer and postprocess calls with those stages' cores in its own
    process (gateway flags `--tokenizer in-process --postprocess in-process`); their servers still run, for tests
    that call them directly. `inference_listen` is where the inference stage listens (`unix:PATH`, as `tandem serve`
    binds it); with `inference_stream` the gateway sends its Infer calls multiplexed on an InferStream.
    """
    cache = gguf_cache if gguf_cache is not None else home / "gguf"
    tokenizer = Tokenizer(ModelRepository(tokenizer_repository or repository, gguf_cache=cache))
    if preload_tokenizer:
        tokenizer.preload()
    core = Inference(
        ModelRepository(repository, gguf_cache=cache),
        home=home,
        **{"intra_op_threads": 1, **(inference_options or {})},
    )
    await core.start()
    postprocess = Postprocessor(ModelRepository(repository, gguf_cache=cache))
    stages: dict[str, RunningServer] = {}
    gateway: RunningServer | None = None
    closing: list[Callable[[], Awaitable[object]]] = []
    try:
        for role, listen, registrars in (
            ("tokenizer", tokenizer_listen, [tokenizer_registrar(tokenizer)]),
            ("inference", inference_listen, [inference_registrar(core), management_registrar(core)]),
            ("postprocess", "127.0.0.1:0", [postprocess_registrar(postprocess)]),
        ):
            stages[role] = await start_server(
                listen, registrars, interceptors=interceptors(role), credentials=credentials
            )
        pipeline = Pipeline(
            LocalTokenizer(tokenizer)
            if in_process
            else TokenizerClient(stages["tokenizer"].address, 64 * MiB, security=links),
            InferenceClient(stages["inference"].address, 64 * MiB, security=links, stream=inference_stream),
            LocalPostprocess(postprocess)
            if in_process
            else PostprocessClient(stages["postprocess"].address, 64 * MiB, security=links),
            **(pipeline_options or {}),
        )
        closing.append(pipeline.close)
        management = ManagementClient(stages["inference"].address, 64 * MiB, security=links)
        closing.append(management.close)
        gateway = await start_server(
            "127.0.0.1:0",
            gateway_services(pipeline, management),
            max_connection_age_s=None,  # as gateway/__main__.py: the public port never recycles connections
            interceptors=interceptors("gateway"),
            credentials=credentials,
        )
        channels = {role: secure_or_insecure_channel(s.address, [], links) for role, s in stages.items()}
        channel = secure_or_insecure_channel(gateway.address, [], links)
        for opened in (channel, *channels.values()):
            closing.append(opened.close)
        yield Stack(repository, core, stages, pipeline, gateway, channel, channels)
    finally:
        if gateway is not None:
            await gateway.stop(0)
        for close in reversed(closing):
            await close()
        # The stages as they are now: a test that restarted one left its new server here.
        for server in stages.values():
            await server.stop(0)
        await core.close()


class FakeManagement(management_pb2_grpc.ManagementServiceServicer):
    """Stands in for the inference stage's ManagementService: the gateway only forwards, so any answer will do.

    The gateway's management API and the OIP's model repository calls both reach it (as in production), so tests can
    make them without touching the session stack's models: loads succeed, unloads (not implemented) are UNIMPLEMENTED.
    """

    async def ListModels(  # noqa: N802
        self, request: management_pb2.ListModelsRequest, context: Any
    ) -> management_pb2.ListModelsResponse:
        return management_pb2.ListModelsResponse()

    async def LoadModel(  # noqa: N802
        self, request: management_pb2.LoadModelRequest, context: Any
    ) -> management_pb2.LoadModelResponse:
        return management_pb2.LoadModelResponse()


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
    """Another gateway over the stack's stages (its management and OIP repository calls go to a fake registry), with
    its own pipeline limits, interceptors and server options."""
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
        gateway_services(pipeline, management),  # as gateway/__main__.py wires it
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


async def await_health(channel: grpc.aio.Channel, want: int, attempts: int = 200, interval_s: float = 0.05) -> None:
    """Polls grpc.health.v1 Check (the server's overall status) on `channel` until it reports `want` (a
    HealthCheckResponse.ServingStatus); fails with the last status seen after `attempts` tries."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    status = None
    for _ in range(attempts):
        status = (await health.Check(health_pb2.HealthCheckRequest())).status
        if status == want:
            return
        await asyncio.sleep(interval_s)
    names = health_pb2.HealthCheckResponse.ServingStatus
    raise AssertionError(f"health is {names.Name(status or 0)} after {attempts} tries, want {names.Name(want)}")
