"""TLS and mTLS: the four services with client certificates required, what they refuse, and bad settings at start-up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import tls
from tandem.cli import devcerts
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.sdk import AsyncTandemClient, TandemClient, tls_credentials
from tests.fixtures import tiny_models
from tests.harness import Stack, serve_stack


@pytest.fixture(scope="module")
async def tls_stack(
    served_repository: Path, certs: devcerts.DevCerts, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """The four servers in-process with mTLS everywhere (the tokenizer on a Unix socket, the rest on loopback TCP);
    the gateway shows the server certificate as its client identity on the stage links, as `tandem serve` does."""
    home = tmp_path_factory.mktemp("tls-home")
    credentials = tls.server_credentials(certs.server_cert, certs.server_key, certs.ca)
    assert credentials is not None
    links = tls.channel_security(
        certs.ca, certs.server_cert, certs.server_key, cert_setting="tls-cert", key_setting="tls-key"
    )
    async with serve_stack(
        served_repository,
        home,
        pipeline_options={"max_inputs": 100},
        credentials=credentials,
        links=links,
        tokenizer_listen=f"unix:{home / 'tokenizer.sock'}",
    ) as stack:
        yield stack


def _client_channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    # A unix: target's certificate is checked for localhost, as the gateway's stage links do.
    options = [("grpc.ssl_target_name_override", "localhost")] if address.startswith("unix:") else []
    if credentials is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, credentials, options)


async def _health(address: str, credentials: grpc.ChannelCredentials | None) -> int:
    async with _client_channel(address, credentials) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)


async def test_embed_over_mtls_is_the_same_as_over_plaintext(
    tls_stack: Stack, stack: Stack, certs: devcerts.DevCerts
) -> None:
    texts = tiny_models.embedding_texts(n=6)
    request = gateway_pb2.EmbedRequest(model="tiny-embed", inputs=texts)
    credentials = tls_credentials(certs.ca, certs.client_cert, certs.client_key)
    async with _client_channel(tls_stack.gateway.address, credentials) as channel:
        secure = await gateway_pb2_grpc.GatewayServiceStub(channel).Embed(request, timeout=30)
    plain = await stack.stub.Embed(request, timeout=30)
    secure_vectors = np.array([e.values for e in secure.embeddings], dtype=np.float32)
    plain_vectors = np.array([e.values for e in plain.embeddings], dtype=np.float32)
    assert secure_vectors.shape == (6, plain_vectors.shape[1])
    np.testing.assert_allclose(secure_vectors, plain_vectors, rtol=0, atol=1e-6)
    # The Python client's TLS option reaches the same gateway, asyncio and blocking alike.
    async with AsyncTandemClient(tls_stack.gateway.address, credentials=credentials) as client:
        np.testing.assert_allclose(await client.embed(texts, model="tiny-embed"), plain_vectors, atol=1e-6)
    with TandemClient(tls_stack.gateway.address, credentials=credentials) as blocking:
        # In a thread: the blocking call must not stall the event loop the in-process servers run on.
        two = await asyncio.to_thread(blocking.embed, texts[:2], model="tiny-embed")
    np.testing.assert_allclose(two, plain_vectors[:2], atol=1e-6)


@pytest.mark.parametrize("listener", ["gateway", "tokenizer", "inference", "postprocess"])
async def test_every_listener_answers_a_client_with_a_certificate_from_the_ca(
    tls_stack: Stack, certs: devcerts.DevCerts, listener: str
) -> None:
    """The control for the refusals below: the same address and CA, with a good client certificate, works."""
    credentials = tls_credentials(certs.ca, certs.client_cert, certs.client_key)
    assert await _health(tls_stack.addresses[listener], credentials) == health_pb2.HealthCheckResponse.SERVING


def _bad_clients(certs: devcerts.DevCerts, other: devcerts.DevCerts) -> dict[str, grpc.ChannelCredentials | None]:
    return {
        "plaintext": None,
        "no client certificate": tls_credentials(certs.ca),
        "client certificate from another CA": tls_credentials(certs.ca, other.client_cert, other.client_key),
        "server from another CA": tls_credentials(other.ca, certs.client_cert, certs.client_key),
    }


BAD_CLIENTS = ["plaintext", "no client certificate", "client certificate from another CA", "server from another CA"]


@pytest.mark.parametrize("client", BAD_CLIENTS)
@pytest.mark.parametrize("listener", ["gateway", "tokenizer", "inference", "postprocess"])
async def test_every_listener_refuses_a_client_without_a_valid_certificate(
    tls_stack: Stack, certs: devcerts.DevCerts, other_certs: devcerts.DevCerts, listener: str, client: str
) -> None:
    credentials = _bad_clients(certs, other_certs)[client]
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await _health(tls_stack.addresses[listener], credentials)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    details = failure.value.details() or ""
    # The connection failed in the handshake, before any RPC reached a handler. When the server refuses the client
    # (no TLS, no certificate, an untrusted one) the client only sees the server hang up; the server logs why.
    assert "failed to connect to all addresses" in details, details
    if client == "server from another CA":
        assert "Tls handshake failed" in details and "CERTIFICATE_VERIFY_FAILED" in details, details
    else:
        # How the hang-up reads depends on where the client's handshake was when it came (seen: "Socket closed",
        # "Connection reset by peer", and "Broken pipe" when the client was still writing its handshake).
        hang_ups = ("Socket closed", "Connection reset by peer", "Broken pipe")
        assert any(text in details for text in hang_ups), details
