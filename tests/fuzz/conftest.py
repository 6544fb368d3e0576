"""The fuzz tests' servers (shared by every module of the folder: one set of servers, as one module had), and the
tally each test reports."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.common.repository import ModelRepository
from services.common.server import start_server
from services.inference.core import Inference
from services.inference.servicer import management_registrar
from services.inference.servicer import registrar as inference_registrar
from tests.fuzz.support import REPORT_ENV, Tally, Targets
from tests.harness import Gateway, Stack, gateway_over


@pytest.fixture(scope="package")
async def gateway(stack: Stack) -> AsyncIterator[Gateway]:
    async with gateway_over(stack, max_inputs=16, max_input_chars=5_000) as gateway:
        yield gateway


@pytest.fixture(scope="package")
async def managed_inference(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """An inference stage serving InferenceService and ManagementService over its own copy of the repository.

    Random management requests may load, unload or alias models (and write aliases.json); they must not do that to
    the session's stack.
    """
    root = tmp_path_factory.mktemp("fuzz")
    repository = root / "repository"
    shutil.copytree(served_repository, repository)
    core = Inference(ModelRepository(repository), home=root / "home", intra_op_threads=1, watch_s=None)
    await core.start()
    server = await start_server("127.0.0.1:0", [inference_registrar(core), management_registrar(core)])
    try:
        yield server.address
    finally:
        await server.stop(0)
        await core.close()


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    tally = Tally(request.node.name)
    yield tally
    line = tally.line()
    codes = ", ".join(f"{code} {n}" for code, n in line["codes"].items())
    print(f"\nfuzz {tally.test}: {tally.sent} messages; {codes}; crashes {tally.crashes}")
    report = os.environ.get(REPORT_ENV)
    if report:
        with open(report, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")


@pytest.fixture(scope="package")
def targets(stack: Stack, gateway: Gateway, managed_inference: str) -> Targets:
    return Targets(
        {
            "gateway": gateway.server.address,
            "tokenizer": stack.stages["tokenizer"].address,
            "inference": managed_inference,
            "postprocess": stack.stages["postprocess"].address,
        }
    )
