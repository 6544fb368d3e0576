"""Reading one version folder: its Hugging Face files (config.json, 1_Pooling, tokenizer and sentence-transformers
settings) and its metadata.json, into the ModelVersion the stages serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from services.common.repository import files, gguf_source
from services.common.repository.config import (
    CONFIG_FILE,
    METADATA_FILE,
    ModelConfig,
    ModelVersion,
    Task,
    VersionMetadata,
)


def _pooling_from_files(path: Path) -> str:
    pooling_file = path / "1_Pooling" / "config.json"
    if not pooling_file.exists():
        return "mean"
    cfg = files.read_json(pooling_file)
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_max_tokens"):
        return "max"
    return "mean"


def _max_length_from_files(path: Path, hf_config: dict[str, Any]) -> int:
    limits: list[int] = []
    st_config = path / "sentence_bert_config.json"
    if st_config.exists():
        value = files.read_json(st_config).get("max_seq_length")
        if isinstance(value, int):
            limits.append(value)
    tok_config = path / "tokenizer_config.json"
    if tok_config.exists():
        value = files.read_json(tok_config).get("model_max_length")
        if isinstance(value, int) and value < 1_000_000:
            limits.append(value)
    positions = hf_config.get("max_position_embeddings", hf_config.get("n_positions"))
    if isinstance(positions, int):
        limits.append(positions)
    return min(limits) if limits else 512


def _has_chat_template(path: Path) -> bool:
    """Whether the version's tokenizer files carry a chat template (chat_template.jinja, or in tokenizer_config)."""
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    tok_config = path / "tokenizer_config.json"
    return tok_config.is_file() and bool(files.read_json(tok_config).get("chat_template"))


def read_metadata(path: Path) -> VersionMetadata | None:
    """A version folder's metadata.json; None when it has none; ValueError when it is unreadable."""
    file = path / METADATA_FILE
    if not file.is_file():
        return None
    try:
        return VersionMetadata.model_validate(files.read_json(file))
    except ValidationError as exc:
        raise ValueError(f"{METADATA_FILE} is invalid: {exc}") from exc


def load_version(
    name: str, version: str, path: Path, config: ModelConfig, gguf_cache: Path | None = None
) -> ModelVersion:
    """Reads a version folder's metadata; raises ValueError naming what is missing or broken.

    A model with tandem.json's `gguf_file` is served from the file's conversion into a Hugging Face folder under
    `gguf_cache` (default ~/.cache/tandem/gguf), made here when the cache has none: that folder is the version's
    `path`, the repository's version folder its `source_path`."""
    source_path: Path | None = None
    if config.gguf_file is not None:
        source_path = path
        path = gguf_source.converted_folder(name, path, config.gguf_file, gguf_cache or gguf_source.default_cache())
    config_file = path / "config.json"
    if not config_file.exists():
        raise ValueError(f"{name}:{version} has no config.json")
    hf_config = files.read_json(config_file)
    metadata = read_metadata(source_path or path)
    if metadata is not None:
        if metadata.task != config.task:
            raise ValueError(f"{METADATA_FILE} says task {metadata.task.value}, {CONFIG_FILE} {config.task.value}")
        if metadata.backend is not None and metadata.backend != config.backend:
            config = config.model_copy(update={"backend": metadata.backend})
    id2label = hf_config.get("id2label") or {}
    labels = tuple(str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k)))
    max_length = config.max_length or _max_length_from_files(path, hf_config)
    prompts, default_prompt = _sentence_transformers_prompts(path) if config.task is Task.EMBEDDING else ({}, "")
    hidden_size = int(hf_config.get("hidden_size", 0))
    too_large = [d for d in config.matryoshka_dimensions or () if hidden_size and d > hidden_size]
    if too_large:
        raise ValueError(f"{CONFIG_FILE} matryoshka_dimensions {too_large} exceed the model's size {hidden_size}")
    return ModelVersion(
        name=name,
        version=version,
        path=path,
        config=config,
        hf_config=hf_config,
        max_length=max_length,
        labels=labels,
        multi_label=hf_config.get("problem_type") == "multi_label_classification",
        hidden_size=hidden_size,
        pooling=config.pooling or _pooling_from_files(path),
        metadata=metadata,
        chat_template=config.task is Task.TEXT_GENERATION and _has_chat_template(path),
        source_path=source_path,
        prompts=prompts,
        default_prompt_name=default_prompt,
    )


def _sentence_transformers_prompts(path: Path) -> tuple[dict[str, str], str]:
    """(prompts, default prompt name) from config_sentence_transformers.json, as sentence-transformers reads them;
    ValueError when the file is unreadable or names a default prompt it does not define."""
    file = path / "config_sentence_transformers.json"
    if not file.is_file():
        return {}, ""
    data = files.read_json(file)
    prompts = data.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ValueError(f"{file.name}: prompts must map names to texts")
    default = data.get("default_prompt_name") or ""
    if default and default not in prompts:
        raise ValueError(f"{file.name}: default_prompt_name {default!r} is not one of its prompts")
    return dict(prompts), str(default)
