"""Shared fixtures: one repository of tiny trained models per test session, built by the tests themselves."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

# Tests must never reach a model hub; everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding tiny-embed, tiny-embed-cls, tiny-sentiment, tiny-topics, tiny-ner, tiny-rerank."""
    from tests.fixtures.tiny_models import build_all

    root = tmp_path_factory.mktemp("repository")
    build_all(root)
    return root


MiB = 1024 * 1024


@dataclass
class Stack:
    stub: Any  # tandem.gateway.v1 GatewayServiceStub
    pipeline: Any  # gateway.core.Pipeline
    gateway: Any  # RunningServer
    stages: dict[str, Any]
    repository: Path


@pytest.fixture(scope="session")
async def stack(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """Tokenizer, inference and postprocess servers plus a gateway, in-process on port 0, on the tiny models."""
    from gateway.clients import InferenceClient, PostprocessClient, TokenizerClient
    from gateway.core import Pipeline
    from gateway.oip.servicer import registrar as oip_registrar
    from gateway.servicer import registrar as gateway_registrar
    from services.common.repository import ModelRepository
    from services.common.server import start_server
    from services.inference.core import Inference
    from services.inference.servicer import registrar as inference_registrar
    from services.postprocess.core import Postprocessor
    from services.postprocess.servicer import registrar as postprocess_registrar
    from services.tokenizer.core import Tokenizer
    from services.tokenizer.servicer import registrar as tokenizer_registrar
    from tandem.gateway.v1 import gateway_pb2_grpc

    home = tmp_path_factory.mktemp("home")
    tokenizer = Tokenizer(ModelRepository(tiny_repository))
    tokenizer.preload()
    inference = Inference(ModelRepository(tiny_repository), home=home, intra_op_threads=1)
    await inference.start()
    postprocess = Postprocessor(ModelRepository(tiny_repository))
    stages = {
        "tokenizer": await start_server("127.0.0.1:0", [tokenizer_registrar(tokenizer)]),
        "inference": await start_server("127.0.0.1:0", [inference_registrar(inference)]),
        "postprocess": await start_server("127.0.0.1:0", [postprocess_registrar(postprocess)]),
    }
    pipeline = Pipeline(
        TokenizerClient(stages["tokenizer"].address, 64 * MiB),
        InferenceClient(stages["inference"].address, 64 * MiB),
        PostprocessClient(stages["postprocess"].address, 64 * MiB),
        max_inputs=100,
    )
    gateway = await start_server("127.0.0.1:0", [gateway_registrar(pipeline), oip_registrar(pipeline)])
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        yield Stack(gateway_pb2_grpc.GatewayServiceStub(channel), pipeline, gateway, stages, tiny_repository)
    await gateway.stop(0)
    await pipeline.close()
    for server in stages.values():
        await server.stop(0)
    await inference.close()
