"""The `tandem models` subcommands: add, export, quantize, list, alias, promote, remove and speed, each over the
repository folder (tandem/cli/model_folders.py) and the inference stage's public export and backend functions."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common import errors
from services.common.repository import (
    ALIASES_FILE,
    CONFIG_FILE,
    DEFAULT_ALIAS,
    METADATA_FILE,
    AccuracyReport,
    Derivation,
    ModelRepository,
    ModelVersion,
    Precision,
    SpeedReport,
    Task,
    check_alias,
    check_name,
    load_version,
    locked,
    parse_reference,
    read_metadata,
    write_json_atomic,
)
from tandem.cli.model_folders import (
    NOT_DERIVED,
    CommandError,
    Context,
    copy_files,
    gguf_source,
    has_weights,
    model_config,
    new_version,
    read_texts,
    reference_version,
    refused,
    resolve,
    source_folder,
    version_metadata,
)

DEFAULT_MIN_COSINE = 0.99
DEFAULT_MIN_AGREEMENT = 0.98


def add(ctx: Context, name: str, source: str, task: str, link: bool) -> int:
    check_name(name, "NAME")
    gguf = gguf_source(source)
    if gguf is not None:
        return _add_gguf(ctx, name, *gguf, task, link)
    folder, described = source_folder(source)
    config_file = ctx.root / name / CONFIG_FILE
    if config_file.is_file():
        config = model_config(ctx, name)
        if config.task.value != task:
            raise CommandError(f"model {name} is a {config.task.value} model; cannot add a {task} version")
        if config.gguf_file is not None:
            raise CommandError(f"model {name} serves the GGUF file {config.gguf_file} in each version, not folders")
    else:
        (ctx.root / name).mkdir(parents=True, exist_ok=True)
        # Generation models run on PyTorch (ONNX Runtime serves the encoders).
        backend = "torch" if task == Task.TEXT_GENERATION.value else "onnx"
        write_json_atomic(config_file, {"task": task, "backend": backend})
        config = model_config(ctx, name)
    with new_version(ctx, name) as (version, staging):
        copy_files(folder, staging, link=link, skip=(METADATA_FILE, "README.md"))
        try:
            model = load_version(name, version, staging, config)
        except (OSError, ValueError) as exc:
            raise CommandError(f"{source} cannot be read as a {task} model: {exc}") from exc
        write_json_atomic(
            staging / METADATA_FILE, version_metadata(model, staging, source=described, precision="fp32", backend=None)
        )
    print(f"added {name}:{version} from {described}")
    return 0


def _add_gguf(ctx: Context, name: str, gguf: Path, described: str, task: str, link: bool) -> int:
    """A GGUF file as a new version of a text-generation model whose tandem.json names that file (`gguf_file`):
    converted once into the GGUF cache (HOME/gguf, where the stages look for it), which also proves it readable."""
    if task != Task.TEXT_GENERATION.value:
        raise CommandError(f"{described} is a GGUF file, which Tandem serves as a text-generation model, not {task}")
    model_dir = ctx.root / name
    config_file = model_dir / CONFIG_FILE
    created = not config_file.is_file()
    if created:
        model_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(config_file, {"task": task, "backend": "torch", "gguf_file": gguf.name})
    try:
        config = model_config(ctx, name)
        if config.task.value != task:
            raise CommandError(f"model {name} is a {config.task.value} model; cannot add a {task} version")
        if config.gguf_file != gguf.name:
            serves = f"the GGUF file {config.gguf_file}" if config.gguf_file else "Hugging Face folders"
            raise CommandError(f"model {name} serves {serves} in each version; add {gguf.name} under another name")
        with new_version(ctx, name) as (version, staging):
            if link:
                (staging / gguf.name).symlink_to(gguf)
            else:
                shutil.copy2(gguf, staging / gguf.name)
            try:
                model = load_version(name, version, staging, config, ctx.home / "gguf")
            except (OSError, ValueError) as exc:
                raise CommandError(f"{described} cannot be read as a {task} model: {exc}") from exc
            metadata = version_metadata(model, model.path, source=described, precision="fp32", backend=None)
            write_json_atomic(staging / METADATA_FILE, metadata)
    except BaseException:
        if created:  # the repository as it was
            shutil.rmtree(model_dir, ignore_errors=True)
        raise
    print(f"added {name}:{version} from {described} (converted into {model.path})")
    return 0


@dataclass
class Derived:
    """What a derivation's build step made in the staging folder: an ONNX graph (model.onnx) or Hugging Face
    weights, at this precision, with notes and, for pruned and distilled versions, their provenance."""

    precision: Precision
    notes: list[str] = field(default_factory=list)
    derivation: Derivation | None = None


Build = Callable[[ModelVersion, Path], Derived]


def derive(ctx: Context, ref: str, kind: str, texts_file: Path | None, build: Build) -> str:
    """Makes a new version from `ref` with `build(source, staging)`, measures it against the original Hugging Face
    weights it descends from (accuracy) and against `ref` (speed and size), and writes both into its metadata;
    returns the new version. It takes no traffic until promoted (see _pin_served_version)."""
    source = resolve(ctx, ref)
    reference = reference_version(ctx, source)
    texts = read_texts(texts_file)
    aliases_file = ctx.root / source.name / ALIASES_FILE
    had_aliases = aliases_file.exists()
    pinned = _pin_served_version(ctx, source.name)
    try:
        version = _build_derived(ctx, source, reference, kind, texts, build)
    except BaseException:
        if pinned is not None:  # the repository as it was: the pin only existed for the version that failed
            with contextlib.suppress(errors.TandemError, OSError):
                if ctx.repository.delete_alias(source.name, DEFAULT_ALIAS) == {} and not had_aliases:
                    aliases_file.unlink()
        raise
    if pinned is not None:
        print(
            f"{source.name}@{DEFAULT_ALIAS} now pins version {pinned}, which requests naming {source.name} got until"
            f" now: they keep getting it; `tandem models promote {source.name} {version}` moves them after the"
            " accuracy gate"
        )
    else:
        stable = ctx.repository.aliases(source.name).get(DEFAULT_ALIAS)
        print(f"requests naming {source.name} keep getting version {stable} ({source.name}@{DEFAULT_ALIAS})")
    return version


def _pin_served_version(ctx: Context, name: str) -> str | None:
    """Before a derived version appears, points `stable` at the version requests naming the model get now, unless
    `stable` exists: a derived version is a candidate that takes traffic only through `promote`, never because the
    version policy prefers the newest. Returns the pinned version, or None when nothing was pinned."""
    try:
        listing = ctx.repository.listing(name)
        if DEFAULT_ALIAS in listing.aliases:
            return None
        served = ModelRepository.default_version(listing)
        if served is None:
            return None
        ctx.repository.set_alias(name, DEFAULT_ALIAS, served)
    except errors.TandemError as err:
        raise refused(err) from None
    return served


def _build_derived(
    ctx: Context,
    source: ModelVersion,
    reference: ModelVersion,
    kind: str,
    texts: Sequence[str],
    build: Build,
) -> str:
    from services.inference.backends.onnx import cpu_backend
    from services.inference.export.accuracy import accuracy_report

    with new_version(ctx, source.name) as (version, staging):
        copy_files(source.path, staging, link=False, skip=NOT_DERIVED)
        made = build(source, staging)
        notes = made.notes
        report: AccuracyReport | None = None
        speed: SpeedReport | None = None
        if source.task is Task.TEXT_GENERATION:
            report, speed = _measure_generation(ctx, source, reference, version, staging, texts)
        else:
            graph = _candidate_graph(ctx, source, version, staging)
            try:
                candidate = cpu_backend(graph, ctx.threads)
            except Exception as exc:  # fp16 graphs with operators the CPU provider lacks
                notes.append(f"accuracy not measured: the graph does not run on this machine's CPU: {exc}")
            else:
                report = accuracy_report(candidate, source, reference, texts, ctx.threads)
                candidate.close()
                speed = _speed(ctx, (source, graph), source, texts)
        metadata = version_metadata(
            source,
            staging,
            source=f"{source.ref} ({kind})",
            precision=made.precision,
            backend=None if has_weights(staging) else "onnx",
            derived_from=source.ref,
            accuracy=report,
            speed=speed,
            derivation=made.derivation,
            notes=notes,
        )
        write_json_atomic(staging / METADATA_FILE, metadata)
    print(f"created {source.name}:{version} ({kind} of {source.ref}, {made.precision})")
    print(_describe_report(report, notes, speed))
    return version


def _candidate_graph(ctx: Context, source: ModelVersion, version: str, staging: Path) -> Path:
    """The new version's ONNX graph: made by the build step, or exported beside the weights it made (so that the
    version carries the graph serving loads)."""
    from services.inference.export.onnx import ensure_onnx

    graph = staging / "model.onnx"
    if not graph.is_file():
        graph, _ = ensure_onnx(load_version(source.name, version, staging, source.config), ctx.home, ctx.threads)
    return graph


def _speed(
    ctx: Context, candidate: tuple[ModelVersion, Path | None], parent: ModelVersion, texts: Sequence[str]
) -> SpeedReport:
    from services.inference.export.speed import cached_graph, speed_report

    graph = None if parent.task is Task.TEXT_GENERATION else cached_graph(parent, ctx.home, ctx.threads)
    return speed_report(candidate, (parent, graph), texts, ctx.threads)


def _measure_generation(
    ctx: Context, source: ModelVersion, reference: ModelVersion, version: str, staging: Path, texts: Sequence[str]
) -> tuple[AccuracyReport, SpeedReport]:
    """Next-token agreement with the original and speed against the source, both with PyTorch."""
    from services.inference.backends.torch import load_hf_model
    from services.inference.export.accuracy import generation_report

    if not has_weights(staging):
        raise CommandError(f"{source.ref} is a text-generation model: only pruning and distillation derive from it")
    candidate = load_version(source.name, version, staging, source.config)
    report = generation_report(load_hf_model(candidate), reference, texts, ctx.threads)
    return report, _speed(ctx, (candidate, None), source, texts)


def _describe_report(report: AccuracyReport | None, notes: Sequence[str] = (), speed: SpeedReport | None = None) -> str:
    if report is None:
        return "accuracy: not measured" + "".join(f"\n  {n}" for n in notes)
    lines = [f"accuracy against {report.reference} (transformers, float32) on {report.texts} texts:"]
    for field_name in ("min_cosine", "mean_cosine", "top1_agreement", "max_probability_difference"):
        value = getattr(report, field_name)
        if value is not None:
            lines.append(f"  {field_name.replace('_', ' ')}: {value:.6f}")
    if speed is not None:
        lines.append(
            f"speed against {speed.parent} on {speed.texts} texts, {speed.threads} threads, CPU (ms per text; ratio"
            " parent/new):"
        )
        for label, new, old in (
            ("one text", speed.ms_per_text_single, speed.parent_ms_per_text_single),
            (f"batch of {speed.batch_size}", speed.ms_per_text_batch, speed.parent_ms_per_text_batch),
        ):
            lines.append(f"  {label}: {new:.3f} ms (parent {old:.3f} ms, {old / max(new, 1e-9):.2f}x)")
        lines.append(
            f"  size on disk: {speed.size_bytes / 1e6:.1f} MB (parent {speed.parent_size_bytes / 1e6:.1f} MB,"
            f" {speed.size_bytes / max(speed.parent_size_bytes, 1):.2f}x)"
        )
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def _source_onnx(ctx: Context, source: ModelVersion) -> Path:
    """The source version's own graph (a derived version), or its export (made now if there is none)."""
    from services.inference.export.onnx import ensure_onnx

    if (source.path / "model.onnx").is_file():
        return source.path / "model.onnx"
    path, _ = ensure_onnx(source, ctx.home, ctx.threads)
    return path


def export(ctx: Context, ref: str, texts_file: Path | None, optimize: bool) -> int:
    from services.inference.export.conversion import optimize_onnx
    from services.inference.export.onnx import export_onnx

    def build(source: ModelVersion, staging: Path) -> Derived:
        if not has_weights(source.path):
            raise CommandError(f"{source.ref} has no Hugging Face weights to export")
        with tempfile.TemporaryDirectory(dir=staging.parent) as tmp:
            raw = Path(tmp) / "model.onnx"
            export_onnx(source, raw, ctx.threads)
            if optimize:
                optimize_onnx(raw, staging / "model.onnx", ctx.threads)
            else:
                shutil.move(raw, staging / "model.onnx")
        notes = ["ONNX Runtime extended graph optimisations applied offline"] if optimize else []
        return Derived("fp32", notes)

    derive(ctx, ref, "export, optimised" if optimize else "export", texts_file, build)
    return 0


def quantize(ctx: Context, ref: str, mode: str, texts_file: Path | None, per_channel: bool) -> int:
    from services.inference.export.conversion import convert_fp16, optimize_onnx, quantize_int8

    def build(source: ModelVersion, staging: Path) -> Derived:
        metadata = source.metadata
        if metadata is not None and metadata.precision != "fp32":
            raise CommandError(f"{source.ref} is already {metadata.precision}; quantise an fp32 version")
        graph = _source_onnx(ctx, source)
        if mode == "fp16":
            used = convert_fp16(graph, staging / "model.onnx")
            return Derived("fp16", [f"converted with {used}, inputs and outputs kept float32"])
        with tempfile.TemporaryDirectory(dir=staging.parent) as tmp:
            optimized = Path(tmp) / "optimized.onnx"
            optimize_onnx(graph, optimized, ctx.threads)
            quantize_int8(optimized, staging / "model.onnx", per_channel=per_channel)
        scales = "per output channel" if per_channel else "per tensor"
        return Derived("int8", [f"onnxruntime quantize_dynamic: int8 MatMul weights {scales}, activations per call"])

    derive(ctx, ref, f"quantize {mode}", texts_file, build)
    return 0


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
            for line in _provenance(row):
                print(f"        {line}")
    return 0


def _provenance(row: dict[str, Any]) -> list[str]:
    """How a pruned or distilled version was made, and its speed against its parent, for `list`."""
    lines = []
    made = row.get("derivation")
    if made:
        settings = ", ".join(f"{k} {v}" for k, v in made["parameters"].items() if v not in (None, 0, 0.0, False))
        steps = f", {made['steps']} steps" if made.get("steps") else ""
        lines.append(
            f"{made['method']} of {made['parent']} ({settings}) on {made['corpus']} ({made['corpus_texts']} texts,"
            f" {made['corpus_sha256'][:19]}){steps} in {made['seconds']:.0f} s"
        )
    speed = row.get("speed")
    if speed:
        lines.append(
            f"speed against {speed['parent']}: one text"
            f" {speed['parent_ms_per_text_single'] / max(speed['ms_per_text_single'], 1e-9):.2f}x, batch of"
            f" {speed['batch_size']} {speed['parent_ms_per_text_batch'] / max(speed['ms_per_text_batch'], 1e-9):.2f}x,"
            f" size {speed['size_bytes'] / max(speed['parent_size_bytes'], 1):.2f}x"
        )
    return lines


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
        raise refused(err) from None
    return 0


def promote(
    ctx: Context,
    name: str,
    version: str,
    alias: str,
    force: bool,
    min_cosine: float | None,
    min_agreement: float | None,
    max_probability_difference: float | None,
) -> int:
    """Points `alias` (stable: what bare requests get) at a version whose accuracy report passes the gate: the
    thresholds given, else those of the model's tandem.json (`promote`), else the defaults."""
    model = resolve(ctx, f"{name}:{version}")
    gate = model.config.promote
    if min_cosine is None:
        min_cosine = gate.min_cosine if gate is not None and gate.min_cosine is not None else DEFAULT_MIN_COSINE
    if min_agreement is None:
        given = gate.min_agreement if gate is not None else None
        min_agreement = given if given is not None else DEFAULT_MIN_AGREEMENT
    if max_probability_difference is None and gate is not None:
        max_probability_difference = gate.max_probability_difference
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
        raise refused(err) from None
    print(f"promoted {model.ref}: {name}@{alias} -> {version}")
    return 0


def remove(ctx: Context, ref: str, force: bool) -> int:
    parsed = parse_reference(ref)
    if parsed.alias is not None:
        raise CommandError("remove takes NAME or NAME:VERSION, not an alias")
    try:
        folder = ctx.repository.contained_folder(parsed.name, parsed.version)
    except errors.TandemError as err:
        raise refused(err) from None
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
    from transformers import AutoTokenizer

    from services.inference.backends.base import BackendOptions
    from services.inference.export.speed import encoder_runner, ms_per_text
    from services.inference.loading import create_backend

    texts = read_texts(texts_file)
    print(f"{len(texts)} texts, {ctx.threads} threads, median of {repeats} runs; ms per text")
    print(f"{'version':<28} {'precision':<9} {'single':>8} {'batch ' + str(batch_size):>10}")
    for ref in refs:
        model = resolve(ctx, ref)
        # One caller, so one instance with every thread: the threads printed above are the threads of each run.
        backend = create_backend(
            model, BackendOptions(home=ctx.home, intra_op_threads=ctx.threads, device="cpu", instances=1)
        )
        tokenizer = AutoTokenizer.from_pretrained(str(model.path))
        single, batched = ms_per_text(encoder_runner(backend, tokenizer, model.max_length), texts, batch_size, repeats)
        precision = model.metadata.precision if model.metadata is not None else "fp32"
        print(f"{model.ref:<28} {precision:<9} {single:>8.2f} {batched:>10.3f}")
        backend.close()
    return 0
