"""API keys at the gateway: who may call at all, who may change models, what stays open, and what is never logged."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.__main__ import build_interceptors
from gateway.priority import PriorityInterceptor
from gateway.settings import GatewaySettings
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.management.v1 import management_pb2, management_pb2_grpc
from tandem.oip.v2 import grpc_service_pb2 as oip
from tandem.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from tandem.sdk import AsyncTandemClient, TandemError
from tests.harness import Gateway, Stack, gateway_over
from tests.status import details_of

USER_KEY = "tk_user_3f9a0c1b2d4e5f60718293a4b5c6d7e8"
ADMIN_KEY = "tk_admin_0a1b2c3d4e5f60718293a4b5c6d7e8f9"
KEYS_FILE = f"""
# Tandem API keys: KEY [SCOPE[,SCOPE]]
{USER_KEY}            # scope defaults to infer
{ADMIN_KEY} infer,admin
"""
EMBED = gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["hello there"])


@pytest.fixture(scope="module")
async def keyed(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(KEYS_FILE)
    settings = GatewaySettings(api_keys_file=keys, listen="127.0.0.1:0")
    async with gateway_over(stack, interceptors=build_interceptors(settings)) as gateway:
        yield gateway


def key(value: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", value),)


def bearer(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {value}"),)


async def refused(call: Awaitable[object]) -> tuple[grpc.StatusCode, str | None, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    d = details_of(caught.value)
    return d.code, d.reason, d.message


async def test_no_key_is_unauthenticated(keyed: Gateway) -> None:
    stub = gateway_pb2_grpc.GatewayServiceStub(keyed.channel)
    code, reason, message = await refused(stub.Embed(EMBED))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS")
    assert "x-api-key" in message
    # A scheme other than Bearer is no credential either.
    code, reason, _ = await refused(stub.Embed(EMBED, metadata=(("authorization", f"Basic {USER_KEY}"),)))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS")


async def test_wrong_key_is_unauthenticated_and_never_logged(keyed: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    stub = gateway_pb2_grpc.GatewayServiceStub(keyed.channel)
    wrong = USER_KEY[:-1] + "0"
    with caplog.at_level(logging.DEBUG):
        for metadata in (key(wrong), bearer(wrong)):
            code, reason, message = await refused(stub.Embed(EMBED, metadata=metadata))
            assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY")
            assert wrong not in message
        # Nor is a good key that lacks a scope.
        management = management_pb2_grpc.ManagementServiceStub(keyed.channel)
        await refused(management.ListModels(management_pb2.ListModelsRequest(), metadata=key(USER_KEY)))
    assert not any(wrong in r.getMessage() or USER_KEY in r.getMessage() for r in caplog.records)


async def test_a_garbage_request_without_a_key_is_refused_unread(keyed: Gateway) -> None:
    raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = keyed.channel.unary_unary(
        "/tandem.gateway.v1.GatewayService/Embed"
    )
    code, reason, _ = await refused(raw(b"\xff\xff\xff not a protobuf"))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS")


async def test_x_api_key_and_bearer_both_work(keyed: Gateway) -> None:
    stub = gateway_pb2_grpc.GatewayServiceStub(keyed.channel)
    for metadata in (key(USER_KEY), bearer(USER_KEY), key(ADMIN_KEY), (("authorization", f"bearer {ADMIN_KEY}"),)):
        reply = await stub.Embed(EMBED, metadata=metadata)
        assert len(reply.embeddings) == 1
    # Streams too: the key is checked once, when the stream opens.
    stream = stub.EmbedStream(iter([gateway_pb2.EmbedStreamRequest(id="a", request=EMBED)]), metadata=key(USER_KEY))
    assert [r.id async for r in stream] == ["a"]
    code, reason, _ = await refused(
        _drain(stub.EmbedStream(iter([gateway_pb2.EmbedStreamRequest(id="a", request=EMBED)])))
    )
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS")


async def _drain(call: grpc.aio.StreamStreamCall[Any, Any] | grpc.aio.UnaryStreamCall[Any, Any]) -> None:
    async for _ in call:
        pass


async def test_the_python_client_sends_its_key(keyed: Gateway) -> None:
    async with AsyncTandemClient(keyed.server.address, api_key=USER_KEY) as client:
        assert (await client.embed(["hi"], model="tiny-embed")).shape[0] == 1
        assert [r.id async for r in client.embed_stream([("x", ["hi"])], model="tiny-embed")] == ["x"]
    async with AsyncTandemClient(keyed.server.address) as anonymous:
        with pytest.raises(TandemError) as caught:
            await anonymous.embed(["hi"], model="tiny-embed")
        assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS")


async def test_management_needs_the_admin_scope(keyed: Gateway) -> None:
    management = management_pb2_grpc.ManagementServiceStub(keyed.channel)
    code, reason, message = await refused(
        management.ListModels(management_pb2.ListModelsRequest(), metadata=key(USER_KEY))
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE")
    assert "ListModels" in message and "'admin'" in message
    code, reason, _ = await refused(management.ListModels(management_pb2.ListModelsRequest()))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS")
    await management.ListModels(management_pb2.ListModelsRequest(), metadata=key(ADMIN_KEY))
    await management.ListModels(management_pb2.ListModelsRequest(), metadata=bearer(ADMIN_KEY))


async def test_oip_repository_changes_need_the_admin_scope(keyed: Gateway) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(keyed.channel)
    unload = oip.RepositoryModelUnloadRequest(model_name="tiny-embed")
    code, reason, _ = await refused(stub.RepositoryModelUnload(unload, metadata=key(USER_KEY)))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE")
    load = oip.RepositoryModelLoadRequest(model_name="tiny-embed")
    code, reason, _ = await refused(stub.RepositoryModelLoad(load, metadata=key(USER_KEY)))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE")
    # With the admin scope the call reaches the registry (tests/harness.py's fake): its load succeeds, its unload is
    # not implemented (UNIMPLEMENTED, not a refusal).
    await stub.RepositoryModelLoad(load, metadata=key(ADMIN_KEY))
    code, reason, _ = await refused(stub.RepositoryModelUnload(unload, metadata=key(ADMIN_KEY)))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    # The rest of the protocol is the data plane: any key.
    assert (await stub.ServerLive(oip.ServerLiveRequest(), metadata=key(USER_KEY))).live
    code, _, _ = await refused(stub.ServerLive(oip.ServerLiveRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_health_and_reflection_stay_open(keyed: Gateway) -> None:
    health = health_pb2_grpc.HealthStub(keyed.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(keyed.channel)
    answers = [
        a
        async for a in reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    ]
    names = {s.name for s in answers[0].list_services_response.service}
    assert "tandem.gateway.v1.GatewayService" in names


async def test_health_and_reflection_can_be_closed(stack: Stack) -> None:
    settings = GatewaySettings(api_keys=f"{USER_KEY}", auth_open_health=False, auth_open_reflection=False)
    async with gateway_over(stack, interceptors=build_interceptors(settings)) as gateway:
        health = health_pb2_grpc.HealthStub(gateway.channel)
        code, reason, _ = await refused(health.Check(health_pb2.HealthCheckRequest()))
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS")
        assert (await health.Check(health_pb2.HealthCheckRequest(), metadata=key(USER_KEY))).status
        # Watch is server-streaming: refused without a key, answered with one.
        code, reason, _ = await refused(_drain(health.Watch(health_pb2.HealthCheckRequest())))
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS")
        watch = health.Watch(health_pb2.HealthCheckRequest(), metadata=key(USER_KEY))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        reflection = reflection_pb2_grpc.ServerReflectionStub(gateway.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        code, reason, _ = await refused(_drain(reflection.ServerReflectionInfo(iter([request]))))
        assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_no_keys_means_no_authentication_and_a_warning_off_loopback(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.__main__"):
        # No authentication: only the priority of each call is read (from its metadata; any level may be asked for).
        assert [type(i) for i in build_interceptors(GatewaySettings(listen="127.0.0.1:0"))] == [PriorityInterceptor]
        assert not caplog.records
        build_interceptors(GatewaySettings(listen="0.0.0.0:50051"))
    assert any("authentication is off" in r.getMessage() for r in caplog.records)
    async with gateway_over(stack) as gateway:
        assert (await gateway_pb2_grpc.GatewayServiceStub(gateway.channel).Embed(EMBED)).embeddings
