"""Shared fixtures: one repository of tiny trained models per test session, built by the tests themselves."""

from __future__ import annotations

import os
from pathlib import Path

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
