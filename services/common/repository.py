"""The model repository: one folder per model with tandem.json and numbered version folders of Hugging Face files."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common import errors

log = logging.getLogger(__name__)

CONFIG_FILE = "tandem.json"


class Task(StrEnum):
    EMBEDDING = "embedding"
    CLASSIFICATION = "classification"
    TOKEN_CLASSIFICATION = "token-classification"
    RERANK = "rerank"


class ModelConfig(BaseModel):
    """Contents of <model>/tandem.json."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    task: Task
    backend: Literal["onnx", "torch"] = "onnx"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_length: int | None = Field(None, gt=1, description="token limit; default from the model's own files")
    pooling: Literal["mean", "cls", "max"] | None = Field(None, description="default from 1_Pooling/config.json")
    max_batch_size: int = Field(32, ge=1, description="sequences per model call")
    max_batch_tokens: int = Field(16384, ge=1, description="padded tokens per model call")
    # 0: an idle model starts at once; requests that arrive while it runs form the next batch (as in TEI).
    max_queue_delay_ms: float = Field(0.0, ge=0, description="longest wait for more work before a call")
    max_queue_size: int = Field(2048, ge=1, description="sequences waiting before RESOURCE_EXHAUSTED")


@dataclass(frozen=True)
class ModelVersion:
    """One version of one model, with what every stage needs to know about it."""

    name: str
    version: str
    path: Path
    config: ModelConfig
    hf_config: dict[str, Any] = field(repr=False)
    max_length: int
    labels: tuple[str, ...]
    multi_label: bool
    hidden_size: int
    pooling: str

    @property
    def task(self) -> Task:
        return self.config.task


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def _pooling_from_files(path: Path) -> str:
    pooling_file = path / "1_Pooling" / "config.json"
    if not pooling_file.exists():
        return "mean"
    cfg = _read_json(pooling_file)
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_max_tokens"):
        return "max"
    return "mean"


def _max_length_from_files(path: Path, hf_config: dict[str, Any]) -> int:
    limits: list[int] = []
    st_config = path / "sentence_bert_config.json"
    if st_config.exists():
        value = _read_json(st_config).get("max_seq_length")
        if isinstance(value, int):
            limits.append(value)
    tok_config = path / "tokenizer_config.json"
    if tok_config.exists():
        value = _read_json(tok_config).get("model_max_length")
        if isinstance(value, int) and value < 1_000_000:
            limits.append(value)
    positions = hf_config.get("max_position_embeddings")
    if isinstance(positions, int):
        limits.append(positions)
    return min(limits) if limits else 512


def load_version(name: str, version: str, path: Path, config: ModelConfig) -> ModelVersion:
    """Reads a version folder's metadata; raises ValueError naming what is missing or broken."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise ValueError(f"{name}:{version} has no config.json")
    hf_config = _read_json(config_file)
    id2label = hf_config.get("id2label") or {}
    labels = tuple(str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k)))
    max_length = config.max_length or _max_length_from_files(path, hf_config)
    return ModelVersion(
        name=name,
        version=version,
        path=path,
        config=config,
        hf_config=hf_config,
        max_length=max_length,
        labels=labels,
        multi_label=hf_config.get("problem_type") == "multi_label_classification",
        hidden_size=int(hf_config.get("hidden_size", 0)),
        pooling=config.pooling or _pooling_from_files(path),
    )


def parse_reference(ref: str) -> tuple[str, str | None]:
    """'name' or 'name:version' -> (name, version or None)."""
    name, sep, version = ref.partition(":")
    if sep and not version.isdigit():
        raise errors.invalid_argument(f"model version must be a number, got {version!r}", "model")
    return name, (version if sep else None)


class ModelRepository:
    """Reads models from a repository folder; resolves 'name' (latest version) and 'name:version'."""

    def __init__(self, root: Path, default_model: str | None = None, rescan_s: float = 1.0) -> None:
        self.root = root
        self.rescan_s = rescan_s
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], ModelVersion] = {}
        # Version listings are reused for `rescan_s`, so a request costs no directory scan on the event loop,
        # while a version folder added to the repository is still seen within a second.
        self._listings: dict[str, tuple[float, list[str] | None]] = {}
        names = self.names()
        self.default_model = default_model or (names[0] if len(names) == 1 else None)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / CONFIG_FILE).is_file())

    def versions(self, name: str) -> list[str]:
        folder = self._model_folder(name)
        return [str(v) for v in sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())]

    def _model_folder(self, name: str) -> Path:
        # Names are single path components: nothing outside the root can be named.
        if (
            not name
            or "/" in name
            or "\\" in name
            or name in (".", "..")
            or not (self.root / name / CONFIG_FILE).is_file()
        ):
            raise errors.not_found(f"model {name!r} not found", model=name)
        return self.root / name

    def config(self, name: str) -> ModelConfig:
        path = self._model_folder(name) / CONFIG_FILE
        try:
            return ModelConfig.model_validate(_read_json(path))
        except (ValidationError, ValueError) as exc:
            raise errors.failed_precondition(
                f"model {name!r} has an invalid {CONFIG_FILE}: {exc}", reason="MODEL_CONFIG_INVALID", model=name
            ) from exc

    def _listed_versions(self, name: str) -> list[str]:
        now = time.monotonic()
        with self._lock:
            hit = self._listings.get(name)
        if hit is None or hit[0] <= now:
            try:
                listing: list[str] | None = self.versions(name)
            except errors.TandemError:
                listing = None
            hit = (now + self.rescan_s, listing)
            if listing is not None:  # unknown names are not kept: callers choose them, memory must not grow
                with self._lock:
                    self._listings[name] = hit
        if hit[1] is None:
            raise errors.not_found(f"model {name!r} not found", model=name)
        return hit[1]

    def resolve(self, ref: str) -> ModelVersion:
        """The model version a request names; NOT_FOUND for unknown models or versions."""
        name, version = parse_reference(ref)
        if not name:
            if self.default_model is None:
                raise errors.invalid_argument("no model named and this server has no default model", "model")
            name = self.default_model
        versions = self._listed_versions(name)
        if not versions:
            raise errors.not_found(f"model {name!r} has no versions", model=name)
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise errors.not_found(f"model {name!r} has no version {version}", model=name, version=version)
        with self._lock:
            cached = self._cache.get((name, version))
        if cached is not None:
            return cached
        try:
            loaded = load_version(name, version, self.root / name / version, self.config(name))
        except (OSError, ValueError, KeyError) as exc:
            raise errors.failed_precondition(
                f"model {name}:{version} is broken: {exc}", reason="MODEL_BROKEN", model=name, version=version
            ) from exc
        with self._lock:
            self._cache[(name, version)] = loaded
        return loaded
