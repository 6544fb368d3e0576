"""TLS and mTLS: the four services with client certificates required, what they refuse, and bad settings at start-up."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import tls
from services.common.server import RunningServer
from tandem import devcerts
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.sdk import NO_RETRY, AsyncTandemClient, TandemClient, tls_credentials
from tests.conftest import Stack
from tests.deployment import tandem_serve
from tests.fixtures import reference, tiny_models

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> devcerts.DevCerts:
    return devcerts.generate(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> devcerts.DevCerts:
    """A second CA with its own server and client certificates: valid certificates the deployment must not trust."""
    return devcerts.generate(tmp_path_factory.mktemp("other-certs"), ca_name="Someone else's CA")


@dataclass
class TlsStack:
    gateway: RunningServer
    stages: dict[str, RunningServer]

    @property
    def addresses(self) -> dict[str, str]:
        return {"gateway": self.gateway.address, **{name: s.address for name, s in self.stages.items()}}


@pytest.fixture(scope="module")
async def tls_stack(
    tiny_repository: Path, certs: devcerts.DevCerts, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TlsStack]:
    """The four servers in-process with mTLS everywhere (the tokenizer on a Unix socket, the rest on loopback TCP);
    the gateway shows the server certificate as its client identity on the stage links, as `tandem serve` does."""
    from gateway.clients import InferenceClient, PostprocessClient, TokenizerClient
    from gateway.core import Pipeline
    from gateway.servicer import registrar as gateway_registrar
    from services.common.repository import ModelRepository
    from services.common.server import start_server
    from services.inference.core import Inference
    from services.inference.servicer import registrar as inference_registrar
    from services.postprocess.core import Postprocessor
    from services.postprocess.servicer import registrar as postprocess_registrar
    from services.tokenizer.core import Tokenizer
    from services.tokenizer.servicer import registrar as tokenizer_registrar

    home = tmp_path_factory.mktemp("tls-home")
    credentials = tls.server_credentials(certs.server_cert, certs.server_key, certs.ca)
    assert credentials is not None
    tokenizer = Tokenizer(ModelRepository(tiny_repository))
    tokenizer.preload()
    inference = Inference(ModelRepository(tiny_repository), home=home, intra_op_threads=1)
    await inference.start()
    postprocess = Postprocessor(ModelRepository(tiny_repository))
    socket = f"unix:{home / 'tokenizer.sock'}"
    stages = {
        "tokenizer": await start_server(socket, [tokenizer_registrar(tokenizer)], credentials=credentials),
        "inference": await start_server("127.0.0.1:0", [inference_registrar(inference)], credentials=credentials),
        "postprocess": await start_server("127.0.0.1:0", [postprocess_registrar(postprocess)], credentials=credentials),
    }
    links = tls.channel_security(
        certs.ca, certs.server_cert, certs.server_key, cert_setting="tls-cert", key_setting="tls-key"
    )
    pipeline = Pipeline(
        TokenizerClient(stages["tokenizer"].address, 64 * MiB, security=links),
        InferenceClient(stages["inference"].address, 64 * MiB, security=links),
        PostprocessClient(stages["postprocess"].address, 64 * MiB, security=links),
        max_inputs=100,
    )
    gateway = await start_server("127.0.0.1:0", [gateway_registrar(pipeline)], credentials=credentials)
    yield TlsStack(gateway, stages)
    await gateway.stop(0)
    await pipeline.close()
    for server in stages.values():
        await server.stop(0)
    await inference.close()


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
    tls_stack: TlsStack, stack: Stack, certs: devcerts.DevCerts
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
    tls_stack: TlsStack, certs: devcerts.DevCerts, listener: str
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
    tls_stack: TlsStack, certs: devcerts.DevCerts, other_certs: devcerts.DevCerts, listener: str, client: str
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


# --- settings ---------------------------------------------------------------------------------------------------


def test_load_reads_nothing_without_tls_settings() -> None:
    from services.tokenizer.settings import TokenizerSettings

    assert tls.load(TokenizerSettings()) == tls.ServiceTls(None, None)


def test_unix_targets_are_checked_for_localhost(certs: devcerts.DevCerts) -> None:
    security = tls.channel_security(certs.ca)
    assert security is not None
    assert security.options("unix:/run/x.sock") == [("grpc.ssl_target_name_override", "localhost")]
    assert security.options("127.0.0.1:1") == []
    named = tls.channel_security(certs.ca, server_name="stage.internal")
    assert named is not None and named.options("unix:/x") == [("grpc.ssl_target_name_override", "stage.internal")]


def _bad_settings(
    certs: devcerts.DevCerts, other: devcerts.DevCerts, tmp: Path
) -> dict[str, tuple[dict[str, Any], str]]:
    garbage = tmp / "garbage.pem"
    garbage.write_text("not a certificate\n")
    return {
        "missing key file": ({"tls_cert": certs.server_cert, "tls_key": tmp / "nope.pem"}, "--tls-key"),
        "cert without key": ({"tls_cert": certs.server_cert}, "--tls-cert needs --tls-key"),
        "key of another cert": ({"tls_cert": certs.server_cert, "tls_key": other.server_key}, "is not the private key"),
        "cert not PEM": ({"tls_cert": garbage, "tls_key": certs.server_key}, "not a PEM certificate"),
        "client CA without cert": ({"tls_client_ca": certs.ca}, "--tls-client-ca needs --tls-cert"),
        "client CA missing": (
            {"tls_cert": certs.server_cert, "tls_key": certs.server_key, "tls_client_ca": tmp / "ca.pem"},
            "--tls-client-ca",
        ),
        "CA missing": ({"tls_ca": tmp / "none.pem"}, "--tls-ca"),
        "client cert without CA": (
            {"tls_client_cert": certs.client_cert, "tls_client_key": certs.client_key},
            "needs --tls-ca",
        ),
    }


BAD_SETTINGS = [
    "missing key file",
    "cert without key",
    "key of another cert",
    "cert not PEM",
    "client CA without cert",
    "client CA missing",
    "CA missing",
    "client cert without CA",
]


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_bad_settings_name_the_flag(
    certs: devcerts.DevCerts, other_certs: devcerts.DevCerts, tmp_path: Path, case: str
) -> None:
    from gateway.settings import GatewaySettings

    fields, message = _bad_settings(certs, other_certs, tmp_path)[case]
    with pytest.raises(tls.TlsError, match=message):
        tls.load(GatewaySettings(**fields))


@pytest.mark.parametrize("module", ["services.tokenizer", "gateway"])
def test_a_missing_key_file_stops_the_service_at_start_up(
    certs: devcerts.DevCerts, tmp_path: Path, module: str
) -> None:
    missing = tmp_path / "missing-key.pem"
    command = [sys.executable, "-m", module, "--listen", "127.0.0.1:0", "--home", str(tmp_path)]
    command += ["--tls-cert", str(certs.server_cert), "--tls-key", str(missing)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "TLS settings: --tls-key" in last and str(missing) in last and "cannot read" in last, done.stderr


def test_tandem_serve_wants_all_three_tls_files(certs: devcerts.DevCerts, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tandem.cli", "serve", "--home", str(tmp_path), "--tls-cert", str(certs.ca)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "TLS needs all three of --tls-cert, --tls-key and --tls-ca" in done.stderr


# --- end to end -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_deployment(
    tiny_repository: Path, certs: devcerts.DevCerts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`tandem serve --tls-*` with two tokenizer replicas (an ipv4: list target) and the rest on Unix sockets."""
    repository = tmp_path_factory.mktemp("tls-repository")
    shutil.copytree(tiny_repository / "tiny-embed", repository / "tiny-embed")
    extra = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--tls-ca", str(certs.ca)]
    extra += ["--replicas", "tokenizer=2", "--inference-args", "--intra-op-threads 1"]
    with tandem_serve(tmp_path_factory.mktemp("home"), repository=repository, extra=extra) as (address, _):
        yield address


@pytest.mark.e2e
def test_tandem_serve_with_mtls(
    tls_deployment: str, tiny_repository: Path, certs: devcerts.DevCerts, other_certs: devcerts.DevCerts
) -> None:
    texts = tiny_models.embedding_texts(n=3)
    with TandemClient(tls_deployment, credentials=tls_credentials(certs.ca, certs.client_cert, certs.client_key)) as c:
        vectors = c.embed(texts, model="tiny-embed")
    expected = reference.reference_embeddings(tiny_repository / "tiny-embed" / "1", texts)
    assert vectors.shape == expected.shape
    assert np.sum(vectors * expected, axis=1).min() >= 0.9999
    for credentials in (
        tls_credentials(certs.ca),
        tls_credentials(certs.ca, other_certs.client_cert, other_certs.client_key),
    ):
        with (
            TandemClient(tls_deployment, credentials=credentials, timeout=5, retry=NO_RETRY) as refused,
            pytest.raises(Exception, match="UNAVAILABLE"),
        ):
            refused.embed(texts, model="tiny-embed")
