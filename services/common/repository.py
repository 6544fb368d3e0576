"""The model repository: one folder per model with tandem.json, numbered version folders of Hugging Face files,
aliases (aliases.json) and per-version metadata (metadata.json), read the same way by every stage."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.common import errors

log = logging.getLogger(__name__)

CONFIG_FILE = "tandem.json"
ALIASES_FILE = "aliases.json"
METADATA_FILE = "metadata.json"
# The alias that requests naming only the model follow, when a model has it.
DEFAULT_ALIAS = "stable"

# Reasons of the registry's errors (google.rpc.ErrorInfo.reason), beside those of services.common.errors.
TOKENIZER_MISMATCH = "TOKENIZER_MISMATCH"
MODEL_NOT_LOADED = "MODEL_NOT_LOADED"
MODEL_BROKEN = "MODEL_BROKEN"
MODEL_CONFIG_INVALID = "MODEL_CONFIG_INVALID"
REPOSITORY_NOT_WRITABLE = "REPOSITORY_NOT_WRITABLE"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}")
_VERSION = re.compile(r"[1-9][0-9]{0,8}")


class Task(StrEnum):
    EMBEDDING = "embedding"
    CLASSIFICATION = "classification"
    TOKEN_CLASSIFICATION = "token-classification"
    RERANK = "rerank"


class VersionPolicy(BaseModel):
    """Which versions are loaded: the newest `latest`, `specific` ones, or `all`; latest 1 when none is given."""

    model_config = ConfigDict(extra="forbid")

    latest: int | None = Field(default=None, ge=1, description="the newest N versions that load")
    specific: list[int] | None = Field(default=None, min_length=1, description="exactly these versions")
    all: bool = Field(default=False, description="every version")

    @model_validator(mode="after")
    def _one_kind(self) -> VersionPolicy:
        given = sum((self.latest is not None, self.specific is not None, self.all))
        if given > 1:
            raise ValueError("version_policy takes one of latest, specific, all")
        if given == 0:
            self.latest = 1
        if self.specific is not None and any(v < 1 for v in self.specific):
            raise ValueError("version_policy.specific holds version numbers (1 or more)")
        return self

    def select(self, versions: Sequence[str], failed: Container[str] = ()) -> list[str]:
        """The versions (ascending) this policy loads; `latest` skips versions that failed, so an older one serves."""
        if self.all:
            return list(versions)
        if self.specific is not None:
            wanted = {str(v) for v in self.specific}
            return [v for v in versions if v in wanted]
        usable = [v for v in versions if v not in failed]
        return usable[-(self.latest or 1) :]

    def describe(self) -> str:
        if self.all:
            return "all versions"
        if self.specific is not None:
            return "versions " + ", ".join(str(v) for v in self.specific)
        return f"the latest {self.latest}"


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
    batch_call_cost_tokens: float | None = Field(
        None,
        ge=0,
        description="the model's fixed cost per call in padded tokens: a round is cut into separate calls where "
        "padding would cost more. Default: measured when the version loads",
    )
    instances: int | None = Field(
        None,
        ge=1,
        le=64,
        description="model calls that run at once, each on its own worker thread; on CPU the stage's threads are "
        "shared out among them. Default: 2 on CPU with 2 or more threads (two single-thread calls side by side "
        "give 15-20% more throughput than one two-thread call under load), else 1",
    )
    run_alone: bool | None = Field(
        None,
        description="on CPU with instances splitting the threads: a call that has the model to itself (nothing "
        "queued, no other call running) runs on a second session with all of the stage's threads (one text at a "
        "time 2-3.5 ms faster on 2 cores). Costs a second copy of the weights in memory. Default: on",
    )
    version_policy: VersionPolicy = Field(default_factory=lambda: VersionPolicy(), description="which versions load")


class AccuracyReport(BaseModel):
    """How closely a derived version reproduces its source model on held-out texts."""

    model_config = ConfigDict(extra="forbid")

    reference: str = Field(description="source model as name:version, run with transformers in float32")
    texts: int = Field(ge=0, description="held-out texts compared")
    min_cosine: float | None = None
    mean_cosine: float | None = None
    top1_agreement: float | None = None
    max_probability_difference: float | None = None


Precision = Literal["fp32", "fp16", "int8"]


class VersionMetadata(BaseModel):
    """Contents of <model>/<version>/metadata.json, written by `tandem models`; folders made by hand have none."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    task: Task
    source: str = ""
    # Overrides tandem.json's backend for this version (an exported or quantised version is ONNX whatever the
    # model's default is).
    backend: Literal["onnx", "torch"] | None = None
    precision: Precision = "fp32"
    tokenizer_fingerprint: str = ""
    max_length: int | None = None
    dimension: int | None = None
    labels: list[str] = Field(default_factory=list)
    created: datetime | None = None
    derived_from: str | None = Field(None, description="name:version this version was exported or quantised from")
    accuracy: AccuracyReport | None = None
    notes: list[str] = Field(default_factory=list)


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
    metadata: VersionMetadata | None = None

    @property
    def task(self) -> Task:
        return self.config.task

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def write_json_atomic(path: Path, data: Mapping[str, Any] | BaseModel) -> None:
    """Writes a file that readers see either whole or not at all (a temporary file renamed over it)."""
    if isinstance(data, BaseModel):
        text = data.model_dump_json(indent=2, exclude_none=True)
    else:
        text = json.dumps(data, indent=2)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on a model folder across processes, for read-modify-write of its aliases."""
    with (folder / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer fingerprint

# Settings the tokenizer stage sets itself per request; they do not change which ids a text gets.
_RUNTIME_KEYS = ("truncation", "padding")
_VOCABULARY_FILES = (
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def _canonical(data: object) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _token_text(value: object) -> object:
    """AddedToken dicts reduced to their text, so that formatting choices do not change the fingerprint."""
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    if isinstance(value, list):
        return [_token_text(v) for v in value]
    return value


def _special_tokens(path: Path) -> dict[str, object]:
    specials: dict[str, object] = {}
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        for key, value in read_json(config_file).items():
            if key.endswith("_token") or key in ("additional_special_tokens", "extra_special_tokens"):
                specials[key] = _token_text(value)
    map_file = path / "special_tokens_map.json"
    if map_file.is_file():
        specials.update({key: _token_text(value) for key, value in read_json(map_file).items()})
    return specials


def tokenizer_fingerprint(path: Path) -> str:
    """'sha256:<hex>' of a version's tokenizer: its tokenizer.json in canonical JSON (sorted keys, no truncation or
    padding settings) plus its special tokens; vocabulary files and the whole tokenizer_config.json stand in for a
    missing tokenizer.json. Empty when the folder holds no tokenizer at all. Equal fingerprints mean equal ids."""
    digest = hashlib.sha256()
    tokenizer_file = path / "tokenizer.json"
    if tokenizer_file.is_file():
        tokenizer = read_json(tokenizer_file)
        for key in _RUNTIME_KEYS:
            tokenizer.pop(key, None)
        digest.update(b"tokenizer.json\0" + _canonical(tokenizer))
    else:
        found = [name for name in _VOCABULARY_FILES if (path / name).is_file()]
        if not found:
            return ""
        for name in found:
            digest.update(name.encode() + b"\0" + (path / name).read_bytes())
        config_file = path / "tokenizer_config.json"
        if config_file.is_file():
            digest.update(b"tokenizer_config.json\0" + _canonical(read_json(config_file)))
    digest.update(b"\0special_tokens\0" + _canonical(_special_tokens(path)))
    return f"sha256:{digest.hexdigest()}"


# ----------------------------------------------------------------------------------------------------------------------
# Version folders


def _pooling_from_files(path: Path) -> str:
    pooling_file = path / "1_Pooling" / "config.json"
    if not pooling_file.exists():
        return "mean"
    cfg = read_json(pooling_file)
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_max_tokens"):
        return "max"
    return "mean"


def _max_length_from_files(path: Path, hf_config: dict[str, Any]) -> int:
    limits: list[int] = []
    st_config = path / "sentence_bert_config.json"
    if st_config.exists():
        value = read_json(st_config).get("max_seq_length")
        if isinstance(value, int):
            limits.append(value)
    tok_config = path / "tokenizer_config.json"
    if tok_config.exists():
        value = read_json(tok_config).get("model_max_length")
        if isinstance(value, int) and value < 1_000_000:
            limits.append(value)
    positions = hf_config.get("max_position_embeddings")
    if isinstance(positions, int):
        limits.append(positions)
    return min(limits) if limits else 512


def read_metadata(path: Path) -> VersionMetadata | None:
    """A version folder's metadata.json; None when it has none; ValueError when it is unreadable."""
    file = path / METADATA_FILE
    if not file.is_file():
        return None
    try:
        return VersionMetadata.model_validate(read_json(file))
    except ValidationError as exc:
        raise ValueError(f"{METADATA_FILE} is invalid: {exc}") from exc


def load_version(name: str, version: str, path: Path, config: ModelConfig) -> ModelVersion:
    """Reads a version folder's metadata; raises ValueError naming what is missing or broken."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise ValueError(f"{name}:{version} has no config.json")
    hf_config = read_json(config_file)
    metadata = read_metadata(path)
    if metadata is not None:
        if metadata.task != config.task:
            raise ValueError(f"{METADATA_FILE} says task {metadata.task.value}, {CONFIG_FILE} {config.task.value}")
        if metadata.backend is not None and metadata.backend != config.backend:
            config = config.model_copy(update={"backend": metadata.backend})
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
        metadata=metadata,
    )


# ----------------------------------------------------------------------------------------------------------------------
# References and names


class Reference(NamedTuple):
    """What a request names: a model (empty: the default one) and at most one of a version and an alias."""

    name: str
    version: str | None = None
    alias: str | None = None


def parse_reference(ref: str) -> Reference:
    """'name', 'name:version' or 'name@alias'."""
    if "@" in ref:
        name, _, alias = ref.partition("@")
        if ":" in name:
            raise errors.invalid_argument(f"name a version or an alias, not both: {ref!r}", "model")
        if not _ALIAS.fullmatch(alias):
            raise errors.invalid_argument(
                f"alias must be a letter followed by letters, digits, '_', '-' or '.', got {alias!r}", "model"
            )
        return Reference(name, alias=alias)
    name, sep, version = ref.partition(":")
    if sep and not version.isdigit():
        raise errors.invalid_argument(f"model version must be a number, got {version!r}", "model")
    return Reference(name, version if sep else None)


def check_name(name: str, field_name: str = "name") -> str:
    """A model name that is one plain folder name (no separators, no '..', not absolute): INVALID_ARGUMENT if not."""
    if not _NAME.fullmatch(name):
        raise errors.invalid_argument(
            f"model name must be one folder name of letters, digits, '_', '-' or '.' (at most 128, not starting with"
            f" '.' or '-'), got {name!r}",
            field_name,
        )
    return name


def check_version(version: str, field_name: str = "version") -> str:
    if not _VERSION.fullmatch(version):
        raise errors.invalid_argument(f"version must be a positive number, got {version!r}", field_name)
    return version


def check_alias(alias: str, field_name: str = "alias") -> str:
    if not _ALIAS.fullmatch(alias):
        raise errors.invalid_argument(
            f"alias must be a letter followed by letters, digits, '_', '-' or '.' (at most 64), got {alias!r}",
            field_name,
        )
    return alias


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


# ----------------------------------------------------------------------------------------------------------------------
# The repository


@dataclass(frozen=True)
class Listing:
    """One model folder as last read: versions (ascending), aliases, version policy, and what could not be read."""

    versions: tuple[str, ...]
    aliases: Mapping[str, str]
    policy: VersionPolicy
    config_error: str = ""
    aliases_error: str = ""


class ModelRepository:
    """Reads models from a repository folder; resolves 'name', 'name:version' and 'name@alias'."""

    def __init__(self, root: Path, default_model: str | None = None, rescan_s: float = 1.0) -> None:
        self.root = root
        self.rescan_s = rescan_s
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], ModelVersion] = {}
        # Listings are reused for `rescan_s`, so a request costs no directory scan on the event loop, while a
        # version folder or alias added to the repository is still seen within a second.
        self._listings: dict[str, tuple[float, Listing | None]] = {}
        names = self.names()
        self.default_model = default_model or (names[0] if len(names) == 1 else None)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / CONFIG_FILE).is_file())

    def versions(self, name: str) -> list[str]:
        folder = self._model_folder(name)
        found = (int(p.name) for p in folder.iterdir() if p.name.isdigit() and not p.name.startswith("0"))
        return [str(v) for v in sorted(found) if (folder / str(v)).is_dir()]

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

    def contained_folder(self, name: str, version: str | None = None) -> Path:
        """The folder of a model (or of one version) named by a management request, refused with INVALID_ARGUMENT
        when the name is not a plain folder name or the folder (through symlinks) lies outside the repository.

        Only names and links are looked at, no file is read, so a refused request reads nothing."""
        check_name(name, "name")
        if version is not None:
            check_version(version, "version")
        root = self.root.resolve()
        folder = self.root / name
        if (folder.is_symlink() or folder.exists()) and (
            not _inside(folder.resolve(), root) or folder.resolve() == root
        ):
            raise errors.invalid_argument(f"model folder {name!r} points outside the repository", "name")
        if not (folder / CONFIG_FILE).is_file():
            raise errors.not_found(f"model {name!r} not found", model=name)
        if version is None:
            return folder
        target = folder / version
        if (target.is_symlink() or target.exists()) and not _inside(target.resolve(), root):
            raise errors.invalid_argument(f"version folder {name}/{version} points outside the repository", "version")
        if not target.is_dir():
            raise errors.not_found(f"model {name!r} has no version {version}", model=name, version=version)
        return target

    def config(self, name: str) -> ModelConfig:
        path = self._model_folder(name) / CONFIG_FILE
        try:
            return ModelConfig.model_validate(read_json(path))
        except (ValidationError, ValueError, OSError) as exc:
            raise errors.failed_precondition(
                f"model {name!r} has an invalid {CONFIG_FILE}: {exc}", reason=MODEL_CONFIG_INVALID, model=name
            ) from exc

    def aliases(self, name: str) -> dict[str, str]:
        """aliases.json of a model, read now: alias -> version. ValueError when the file is unreadable."""
        path = self._model_folder(name) / ALIASES_FILE
        if not path.is_file():
            return {}
        aliases: dict[str, str] = {}
        for alias, version in read_json(path).items():
            # Written as strings; numbers typed by hand ({"stable": 2}) are taken too.
            text = str(version) if isinstance(version, int) and not isinstance(version, bool) else version
            if not isinstance(text, str) or not _ALIAS.fullmatch(alias) or not _VERSION.fullmatch(text):
                raise ValueError(f"{ALIASES_FILE} maps {alias!r} to {version!r}; expected alias -> version number")
            aliases[alias] = text
        return aliases

    def set_alias(self, name: str, alias: str, version: str) -> dict[str, str]:
        """Points an alias at an existing version in aliases.json (atomically, under the model's lock)."""
        check_alias(alias)
        folder = self.contained_folder(name, version).parent
        with self._writing(name, folder):
            current = self.aliases(name)
            current[alias] = version
            write_json_atomic(folder / ALIASES_FILE, dict(sorted(current.items())))
        self.invalidate(name, versions=False)
        return current

    def delete_alias(self, name: str, alias: str) -> dict[str, str]:
        check_alias(alias)
        folder = self.contained_folder(name)
        with self._writing(name, folder):
            current = self.aliases(name)
            if alias not in current:
                raise errors.not_found(f"model {name!r} has no alias {alias!r}", model=name, alias=alias)
            del current[alias]
            write_json_atomic(folder / ALIASES_FILE, dict(sorted(current.items())))
        self.invalidate(name, versions=False)
        return current

    @contextlib.contextmanager
    def _writing(self, name: str, folder: Path) -> Iterator[None]:
        """The model folder locked for a change of aliases.json; FAILED_PRECONDITION when it cannot be written
        (a repository mounted read-only), and for an aliases.json that cannot be read."""
        try:
            with locked(folder):
                yield
        except OSError as exc:
            raise errors.failed_precondition(
                f"cannot change {ALIASES_FILE} of {name!r}: {exc}", reason=REPOSITORY_NOT_WRITABLE, model=name
            ) from exc
        except ValueError as exc:
            raise errors.failed_precondition(
                f"{ALIASES_FILE} of {name!r} is invalid: {exc}", reason=MODEL_CONFIG_INVALID, model=name
            ) from exc

    def listing(self, name: str) -> Listing:
        """The model folder read now (NOT_FOUND for unknown models)."""
        versions = tuple(self.versions(name))
        config_error = aliases_error = ""
        try:
            policy = self.config(name).version_policy
        except errors.TandemError as exc:
            policy, config_error = VersionPolicy(), str(exc)
        try:
            aliases = self.aliases(name)
        except (OSError, ValueError) as exc:
            aliases, aliases_error = {}, f"{ALIASES_FILE} of {name!r} is invalid: {exc}"
        return Listing(versions, aliases, policy, config_error, aliases_error)

    def _listed(self, name: str, fresh: bool = False) -> Listing:
        now = time.monotonic()
        with self._lock:
            hit = self._listings.get(name)
        if fresh or hit is None or hit[0] <= now:
            try:
                listing: Listing | None = self.listing(name)
            except errors.TandemError:
                listing = None
            hit = (now + self.rescan_s, listing)
            if listing is not None:  # unknown names are not kept: callers choose them, memory must not grow
                with self._lock:
                    self._listings[name] = hit
        if hit[1] is None:
            raise errors.not_found(f"model {name!r} not found", model=name)
        return hit[1]

    def invalidate(self, name: str, versions: bool = True) -> None:
        """Forgets what was read of a model, so that the next request reads its folder again."""
        with self._lock:
            self._listings.pop(name, None)
            if versions:
                for key in [k for k in self._cache if k[0] == name]:
                    del self._cache[key]

    @staticmethod
    def default_version(listing: Listing) -> str | None:
        """The version a bare name gets: the `stable` alias when set, else the newest the policy loads."""
        stable = listing.aliases.get(DEFAULT_ALIAS)
        if stable is not None and stable in listing.versions:
            return stable
        chosen = listing.policy.select(listing.versions)
        if chosen:
            return chosen[-1]
        return listing.versions[-1] if listing.versions else None

    def target(self, ref: str) -> tuple[str, str]:
        """(name, version) a reference names, without reading the version folder; NOT_FOUND when there is none."""
        parsed = parse_reference(ref)
        name = parsed.name
        if not name:
            if self.default_model is None:
                raise errors.invalid_argument("no model named and this server has no default model", "model")
            name = self.default_model
        listing = self._listed(name)
        if parsed.version is not None:
            if parsed.version not in listing.versions:
                # A version added since the listing was read (a pinned request from another stage): read again.
                listing = self._listed(name, fresh=True)
                if parsed.version not in listing.versions:
                    raise errors.not_found(
                        f"model {name!r} has no version {parsed.version}", model=name, version=parsed.version
                    )
            return name, parsed.version
        if listing.aliases_error and (parsed.alias is not None or DEFAULT_ALIAS not in listing.aliases):
            raise errors.failed_precondition(listing.aliases_error, reason=MODEL_CONFIG_INVALID, model=name)
        if parsed.alias is not None:
            version = listing.aliases.get(parsed.alias)
            if version is None:
                listing = self._listed(name, fresh=True)
                version = listing.aliases.get(parsed.alias)
            if version is None:
                raise errors.not_found(f"model {name!r} has no alias {parsed.alias!r}", model=name, alias=parsed.alias)
            if version not in listing.versions:
                raise errors.not_found(
                    f"alias {parsed.alias!r} of model {name!r} names version {version}, which is not in the repository",
                    model=name,
                    alias=parsed.alias,
                )
            return name, version
        if not listing.versions:
            raise errors.not_found(f"model {name!r} has no versions", model=name)
        version = self.default_version(listing)
        assert version is not None
        return name, version

    def load(self, name: str, version: str) -> ModelVersion:
        """A version's metadata, read once and cached; FAILED_PRECONDITION when its files are missing or broken."""
        with self._lock:
            cached = self._cache.get((name, version))
        if cached is not None:
            return cached
        try:
            loaded = load_version(name, version, self.root / name / version, self.config(name))
        except (OSError, ValueError, KeyError) as exc:
            raise errors.failed_precondition(
                f"model {name}:{version} is broken: {exc}", reason=MODEL_BROKEN, model=name, version=version
            ) from exc
        with self._lock:
            self._cache[(name, version)] = loaded
        return loaded

    def resolve(self, ref: str) -> ModelVersion:
        """The model version a request names; NOT_FOUND for unknown models, versions or aliases."""
        return self.load(*self.target(ref))
