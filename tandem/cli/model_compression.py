"""`tandem models prune` and `tandem models distill`: smaller versions of a model, made from its Hugging Face weights
(structured pruning, knowledge distillation) and then measured, recorded and gated like a quantised version
(model_commands.derive)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.repository import (
    Derivation,
    ModelVersion,
    Task,
    load_version,
    tokenizer_fingerprint,
)
from tandem.cli.model_commands import Derived, derive
from tandem.cli.model_folders import CommandError, Context, has_weights, resolve

# Calibration texts for pruning importance: enough for stable scores, cheap on CPU.
CALIBRATION_TEXTS = 512
# Part of a checkpoint's key: a run of an older objective or layer choice is never resumed by this one.
OBJECTIVE = "2026-12-05: embedding token states matched, layers chosen by closeness"


def _corpus(path: Path | None) -> Any:
    from services.inference.export.corpus import CorpusError, read_corpus

    try:
        return read_corpus(path)
    except CorpusError as exc:
        raise CommandError(str(exc)) from None


def _derivable(ctx: Context, ref: str) -> ModelVersion:
    """The version to prune or distil, refused unless it holds Hugging Face weights in a folder of its own."""
    source = resolve(ctx, ref)
    if source.config.gguf_file is not None:
        raise CommandError(
            f"{source.ref} is a GGUF file; pruning and distillation write Hugging Face folders, which model "
            f"{source.name} (gguf_file) cannot hold: add the converted folder as a model of its own"
        )
    if not has_weights(source.path):
        parent = source.metadata.derived_from if source.metadata is not None else None
        hint = f" (derived from {parent}: prune or distil that)" if parent else ""
        raise CommandError(f"{source.ref} has no Hugging Face weights to prune or distil{hint}")
    return source


def _layer_total(source: ModelVersion) -> int:
    config = source.hf_config
    for key in ("num_hidden_layers", "n_layer", "n_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    raise CommandError(f"{source.ref}: config.json gives no number of layers")


def _check_layers(source: ModelVersion, layers: int | None) -> None:
    total = _layer_total(source)
    if layers is not None and not 1 <= layers <= total:
        raise CommandError(f"--layers must be between 1 and {total} ({source.ref} has {total} layers), got {layers}")


def prune(
    ctx: Context,
    ref: str,
    heads: float,
    ffn: float,
    layers: int | None,
    corpus_file: Path | None,
    texts_file: Path | None,
) -> int:
    from services.inference.backends.torch import load_hf_model
    from services.inference.export import pruning
    from services.inference.export.distillation import Student, TokenizedTexts

    source = _derivable(ctx, ref)
    _check_layers(source, layers)
    for flag, value in (("--heads", heads), ("--ffn", ffn)):
        if not 0 <= value < 1:
            raise CommandError(f"{flag} is the fraction to remove: at least 0 and below 1 (1 removes them all)")
    if heads == 0 and ffn == 0 and layers is None:
        raise CommandError("nothing to prune: give --heads, --ffn or --layers")
    corpus = _corpus(corpus_file)

    def build(source: ModelVersion, staging: Path) -> Derived:
        from transformers import AutoTokenizer

        started = time.perf_counter()
        model: Any = load_hf_model(source)
        before = pruning.parameter_count(model)
        try:
            head_size = pruning.attention_head_size(model) if heads else None
            if heads and head_size is None:
                pruning.prune_heads(model, heads, [])  # raises the family's reason
            spec = Student(source.task, source.pooling, source.multi_label)
            calibration = TokenizedTexts(
                AutoTokenizer.from_pretrained(str(source.path)),
                corpus.texts[:CALIBRATION_TEXTS],
                spec,
                min(128, source.max_length),
            )
            rows = list(range(len(calibration)))
            step = pruning.CALIBRATION_BATCH

            def batches() -> Any:
                return (calibration.batch(rows[i : i + step], model.device) for i in range(0, len(rows), step))

            importance = pruning.measure_importance(model, batches, head_size)
            parameters: dict[str, Any] = {"heads": heads, "ffn": ffn, "layers": layers}
            if ffn:
                parameters["intermediate_size"] = pruning.prune_ffn(model, ffn, importance)
            if heads:
                assert importance.heads is not None
                parameters["attention_heads"] = pruning.prune_heads(model, heads, importance.heads)
            if layers is not None:
                kept = pruning.most_important_layers(importance, layers)
                pruning.keep_layers(model, kept)
                parameters["kept_layers"] = kept
        except pruning.PruningError as exc:
            raise CommandError(str(exc)) from None
        model.save_pretrained(str(staging))
        after = pruning.parameter_count(model)
        derivation = Derivation(
            method="prune",
            parent=source.ref,
            parameters=parameters,
            corpus=corpus.source,
            corpus_sha256=corpus.sha256,
            corpus_texts=len(calibration),
            seconds=round(time.perf_counter() - started, 2),
            parameter_count=after,
            parent_parameter_count=before,
        )
        what = ", ".join(f"{k} {v}" for k, v in parameters.items() if v)
        return Derived("fp32", [f"structured pruning ({what}): {before:,} -> {after:,} parameters"], derivation)

    derive(ctx, ref, "prune", texts_file, build)
    return 0


@dataclass(frozen=True)
class DistillOptions:
    layers: int | None
    student: Path | None
    corpus: Path | None
    steps: int
    batch_size: int
    lr: float
    seed: int
    temperature: float
    max_tokens: int
    device: str
    checkpoint_every: int
    resume: bool


def _student_folder(source: ModelVersion, folder: Path) -> ModelVersion:
    """A --student folder, refused unless its tokenizer gives the parent's ids and its outputs have the parent's
    shape (embedding size, labels, vocabulary)."""
    if not (folder / "config.json").is_file():
        raise CommandError(f"--student {folder} is not a Hugging Face model folder (no config.json)")
    fingerprint = tokenizer_fingerprint(folder)
    if fingerprint != tokenizer_fingerprint(source.path):
        found = "holds no tokenizer" if not fingerprint else "has another tokenizer (tokenizer fingerprint differs)"
        raise CommandError(f"--student {folder} {found}: a student must tokenize as {source.ref} does")
    try:
        student = load_version(source.name, "student", folder, source.config)
    except (OSError, ValueError) as exc:
        raise CommandError(f"--student {folder} cannot be read as a {source.task.value} model: {exc}") from exc
    checks = {
        Task.EMBEDDING: ("embedding size", student.hidden_size, source.hidden_size),
        Task.TEXT_GENERATION: (
            "vocabulary size",
            student.hf_config.get("vocab_size"),
            source.hf_config.get("vocab_size"),
        ),
    }
    what, got, want = checks.get(source.task, ("labels", list(student.labels), list(source.labels)))
    if got != want:
        raise CommandError(f"--student {folder}: {what} {got} differs from {source.ref}'s {want}")
    return student


def _closeness(teacher: Any, spec: Any, tokenizer: Any, corpus: Any) -> Callable[[Any], float]:
    """How close an embedding model's pooled outputs are to `teacher`'s (mean cosine) on the corpus's first
    CALIBRATION_TEXTS texts: what chooses the layers a --layers student keeps (pruning.closest_layers)."""
    import torch

    from services.inference.export.distillation import TokenizedTexts, pool

    texts = TokenizedTexts(tokenizer, corpus.texts[:CALIBRATION_TEXTS], spec, 128)
    device = next(teacher.parameters()).device
    batches = [texts.batch(list(range(i, min(i + 64, len(texts)))), device) for i in range(0, len(texts), 64)]

    def pooled(model: Any) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [pool(model(**b).last_hidden_state, b["attention_mask"], spec.pooling) for b in batches]

    want = pooled(teacher)

    def closeness(model: Any) -> float:
        got = pooled(model)
        cosines = [torch.nn.functional.cosine_similarity(g, w, dim=-1) for g, w in zip(got, want, strict=True)]
        return float(torch.cat(cosines).mean())

    return closeness


def _checkpoint(ctx: Context, source: ModelVersion, options: DistillOptions, corpus_hash: str) -> Path:
    """Where this run's checkpoint lives: under HOME (never in the repository), keyed by everything that decides the
    result, so --resume only ever continues the same run."""
    key = {
        "objective": OBJECTIVE,
        "parent": source.ref,
        "fingerprint": tokenizer_fingerprint(source.path),
        "corpus": corpus_hash,
        **{k: str(v) for k, v in vars(options).items() if k not in ("resume", "checkpoint_every", "corpus")},
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return ctx.home / "checkpoints" / source.name / digest / "checkpoint.pt"


def distill(ctx: Context, ref: str, options: DistillOptions, texts_file: Path | None) -> int:
    import torch

    from services.inference.backends.torch import load_hf_model
    from services.inference.export import pruning
    from services.inference.export.distillation import DistillationError, DistillSettings, Student
    from services.inference.export.distillation import distill as train

    source = _derivable(ctx, ref)
    if options.layers is None and options.student is None:
        raise CommandError("give the student: --layers K (the parent with K of its layers) or --student FOLDER")
    student_source = _student_folder(source, options.student) if options.student is not None else source
    _check_layers(student_source, options.layers)
    if options.steps < 1 or options.batch_size < 1 or options.lr <= 0 or options.checkpoint_every < 1:
        raise CommandError("--steps, --batch-size, --lr and --checkpoint-every must be positive")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: torch sees no CUDA GPU")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if options.device == "auto" else options.device
    corpus = _corpus(options.corpus)
    checkpoint = _checkpoint(ctx, source, options, corpus.sha256)
    if options.resume and not checkpoint.is_file():
        print(f"no checkpoint of this run at {checkpoint}: starting at step 0")

    def build(source: ModelVersion, staging: Path) -> Derived:
        from transformers import AutoTokenizer

        torch.set_num_threads(ctx.threads)
        teacher = load_hf_model(source)
        student: Any = load_hf_model(student_source) if options.student is not None else copy.deepcopy(teacher)
        before = pruning.parameter_count(teacher)
        parameters: dict[str, Any] = {
            k: v for k, v in vars(options).items() if k not in ("resume", "corpus", "student", "device")
        }
        parameters["student"] = str(options.student.resolve()) if options.student is not None else "parent layers"
        tokenizer = AutoTokenizer.from_pretrained(str(source.path))
        spec = Student(source.task, source.pooling, source.multi_label)
        if options.layers is not None:
            if source.task is Task.EMBEDDING and options.student is None:
                kept = pruning.closest_layers(student, options.layers, _closeness(teacher, spec, tokenizer, corpus))
            else:
                kept = pruning.spread_layers(pruning.layer_count(student), options.layers)
            pruning.keep_layers(student, kept)
            parameters["kept_layers"] = kept
            if options.student is None:
                spec = dataclasses.replace(spec, teacher_layers=tuple(kept))
        settings = DistillSettings(
            steps=options.steps,
            batch_size=options.batch_size,
            lr=options.lr,
            seed=options.seed,
            temperature=options.temperature,
            max_tokens=min(options.max_tokens, source.max_length),
            checkpoint_every=options.checkpoint_every,
            device=device,
        )
        try:
            result = train(teacher, student, spec, tokenizer, corpus.texts, settings, checkpoint, options.resume)
        except DistillationError as exc:
            raise CommandError(str(exc)) from None
        student.save_pretrained(str(staging))
        derivation = Derivation(
            method="distill",
            parent=source.ref,
            parameters=parameters,
            corpus=corpus.source,
            corpus_sha256=corpus.sha256,
            corpus_texts=len(corpus.texts),
            steps=result.steps,
            seconds=round(result.seconds, 2),
            parameter_count=pruning.parameter_count(student),
            parent_parameter_count=before,
        )
        resumed = f", resumed at step {result.resumed_from}" if result.resumed_from else ""
        note = (
            f"distilled from {source.ref} in {result.steps} steps on {device}{resumed}: final loss {result.loss:.5f}"
            f" ({result.seconds:.0f} s)"
        )
        return Derived("fp32", [note], derivation)

    derive(ctx, ref, "distill", texts_file, build)
    shutil.rmtree(checkpoint.parent, ignore_errors=True)  # the version exists: the checkpoint served its purpose
    return 0
