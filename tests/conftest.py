"""Shared fixtures: the tiny trained models (built by the tests themselves, once per session), the copy of them that
servers load, the session's in-process stack and development certificates."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tandem.cli.devcerts import DevCerts
    from tests.harness import Stack

# Tests must never reach a model hub; everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Each folder is one kind of test, and its tests carry its name as a marker (pyproject.toml describes them).
KINDS = ("unit", "service", "e2e", "deploy", "fuzz", "gpu")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks every test with its folder's kind, so that `-m unit` or `-m "not e2e"` selects without naming paths."""
    root = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(root):
            kind = item.path.relative_to(root).parts[0]
            if kind in KINDS:
                item.add_marker(kind)


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A model repository holding tiny-embed, tiny-embed-cls, tiny-sentiment, tiny-topics, tiny-ner, tiny-rerank:
    Hugging Face files only, never loaded by a server (they load `served_repository`), so every test that reads or
    copies it sees the same files whatever ran before it."""
    from tests.fixtures.tiny_models import build_all

    root = tmp_path_factory.mktemp("repository")
    build_all(root)
    yield root
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*.onnx"))
    assert not written, f"a test loaded tiny_repository instead of served_repository and exported {written}"


@pytest.fixture(scope="session")
def served_repository(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of tiny_repository with each model's ONNX graph exported beside it (as `tandem models export` leaves a
    folder): what in-process stacks and deployments serve. Exported up front, so no test's result depends on which
    test loaded a model first."""
    from services.common.repository import ModelRepository
    from services.inference.export.onnx import ensure_onnx

    root = tmp_path_factory.mktemp("served-repository")
    shutil.copytree(tiny_repository, root, dirs_exist_ok=True)
    repository, home = ModelRepository(root), tmp_path_factory.mktemp("export-home")
    for model_dir in sorted(root.iterdir()):
        model = repository.resolve(model_dir.name)
        if model.config.backend == "onnx":
            ensure_onnx(model, home, threads=1)
    return root


@pytest.fixture(scope="session")
def causal_repository(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with the two tiny causal LMs (tiny-gpt2, tiny-llama-chat; tests/fixtures/tiny_causal.py) and
    a copy of the served tiny-sentiment classifier, so that generation tests can also ask an encoder to generate."""
    from tests.fixtures.tiny_causal import build_causal

    root = tmp_path_factory.mktemp("causal-repository")
    build_causal(root)
    shutil.copytree(served_repository / "tiny-sentiment", root / "tiny-sentiment")
    return root


@pytest.fixture(scope="session")
async def stack(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """Tokenizer, inference and postprocess servers plus a gateway, in-process on port 0, on the tiny models."""
    from tests.harness import serve_stack

    home = tmp_path_factory.mktemp("home")
    async with serve_stack(served_repository, home, pipeline_options={"max_inputs": 100}) as running:
        yield running


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    """A development CA with server and client certificates, as `tandem devcerts` makes them."""
    from tandem.cli import devcerts

    return devcerts.generate(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    """A second CA with its own server and client certificates: valid certificates the deployment must not trust."""
    from tandem.cli import devcerts

    return devcerts.generate(tmp_path_factory.mktemp("other-certs"), ca_name="Someone else's CA")
