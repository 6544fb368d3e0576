"""The inference stage the service tests of this folder share: copies of the tiny models (their exports land in
the copies), PyTorch-backed variants and a broken model, served in-process with a probe around every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.repository import ModelRepository
from services.common.server import start_server
from services.inference.core import Inference
from services.inference.servicer import SERVICE_NAME, registrar
from tandem.inference.v1 import inference_pb2_grpc
from tests.service.inference.support import Probes, Served, copy_model


@pytest.fixture(scope="package")
def repo(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of the shared tiny models (exports land in the copies), plus variants and one broken model."""
    root = tmp_path_factory.mktemp("inference-repo")
    copy_model(tiny_repository / "tiny-embed", root / "tiny-embed")
    copy_model(tiny_repository / "tiny-sentiment", root / "tiny-sentiment")
    # PyTorch-backed variants: same weights, no export, and limits small enough to fill.
    copy_model(tiny_repository / "tiny-embed", root / "tiny-embed-torch", backend="torch")
    copy_model(tiny_repository / "tiny-ner", root / "tiny-ner", backend="torch")
    copy_model(tiny_repository / "tiny-rerank", root / "tiny-rerank", backend="torch")
    # One instance, so a call held at the probe's gate makes the next ones queue behind it.
    copy_model(
        tiny_repository / "tiny-sentiment", root / "tiny-small-queue", backend="torch", max_queue_size=4, instances=1
    )
    broken = copy_model(tiny_repository / "tiny-sentiment", root / "tiny-broken", backend="torch")
    (broken / "1" / "model.safetensors").write_bytes(b"not a safetensors file")
    return root


@pytest_asyncio.fixture(scope="package")
async def served(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    probes = Probes()
    core = Inference(
        ModelRepository(repo), home=tmp_path_factory.mktemp("home"), intra_op_threads=2, backend_factory=probes.factory
    )
    running = await start_server("127.0.0.1:0", [registrar(core)], serving=False)
    channel = grpc.aio.insecure_channel(running.address)
    before = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    await core.start()
    await running.set_serving(True)
    yield Served(core, running, channel, inference_pb2_grpc.InferenceServiceStub(channel), probes, repo, before.status)
    await channel.close()
    await running.stop(0)
    await core.close()
