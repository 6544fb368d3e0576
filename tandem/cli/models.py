"""`tandem models`: the model repository on disk — add versions, export, quantise, prune and distil them (each with
an accuracy report against the source model), aliases, promotion behind an accuracy gate, removal, and speed
comparisons.

Works on the folder only; running stages see new versions and aliases within a second (or on ReloadModel), and
move requests to a version only once it is loaded and warm.

This module is the command line; model_commands.py holds the subcommands, model_compression.py prune and distill,
model_folders.py the repository folder operations they share.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from services.common import errors
from services.common.repository import ModelRepository, Task
from services.common.settings import default_home, usable_cpus
from tandem.cli.model_commands import (
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_MIN_COSINE,
    add,
    export,
    list_models,
    promote,
    quantize,
    remove,
    set_alias,
    speed,
)
from tandem.cli.model_compression import DistillOptions, distill, prune
from tandem.cli.model_folders import CommandError, Context


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

    corpus = argparse.ArgumentParser(add_help=False)
    corpus.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="texts to measure importance on or train with: one per line, or JSONL (.jsonl: objects with a"
        ' "text" field); default: the English prose that ships with Python (docs/models.md)',
    )

    p = sub.add_parser(
        "prune", parents=[common, texts, corpus], help="new version: heads, FFN neurons or layers removed"
    )
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p.add_argument("--heads", type=float, default=0.0, metavar="F", help="fraction of attention heads to remove")
    p.add_argument("--ffn", type=float, default=0.0, metavar="F", help="fraction of FFN neurons to remove")
    p.add_argument("--layers", type=int, default=None, metavar="K", help="keep the K most important layers")

    p = sub.add_parser("distill", parents=[common, texts, corpus], help="new version: a student trained on the parent")
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p.add_argument("--layers", type=int, default=None, metavar="K", help="student: the parent with K layers kept")
    p.add_argument("--student", type=Path, default=None, metavar="FOLDER", help="student: a Hugging Face folder")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=2.0, help="classifiers and text generation: softening")
    p.add_argument("--max-tokens", type=int, default=128, help="texts are cut to this many tokens in training")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--checkpoint-every", type=int, default=200, metavar="N", help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue this run from its last checkpoint")

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
    p.add_argument(
        "--min-cosine",
        type=float,
        default=None,
        help=f"embeddings: lowest min cosine (default: tandem.json's promote.min_cosine, else {DEFAULT_MIN_COSINE})",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        help="classifiers, text generation: lowest top-1 agreement (default: tandem.json's promote.min_agreement,"
        f" else {DEFAULT_MIN_AGREEMENT})",
    )
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
    with _terminated_like_interrupted():
        return _run(ctx, opts)


@contextlib.contextmanager
def _terminated_like_interrupted() -> Iterator[None]:
    """SIGTERM (a killed job, a container stopped) ends the command as Ctrl-C does, so that what it was making is
    cleaned up: no staging folder of a half-made version stays behind, a pinned alias is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(ctx: Context, opts: argparse.Namespace) -> int:
    try:
        match opts.command:
            case "add":
                return add(ctx, opts.name, opts.source, opts.task, opts.link)
            case "export":
                return export(ctx, opts.ref, opts.texts, opts.optimize)
            case "quantize":
                return quantize(ctx, opts.ref, opts.mode, opts.texts, opts.per_channel)
            case "prune":
                return prune(ctx, opts.ref, opts.heads, opts.ffn, opts.layers, opts.corpus, opts.texts)
            case "distill":
                options = DistillOptions(
                    layers=opts.layers,
                    student=opts.student,
                    corpus=opts.corpus,
                    steps=opts.steps,
                    batch_size=opts.batch_size,
                    lr=opts.lr,
                    seed=opts.seed,
                    temperature=opts.temperature,
                    max_tokens=opts.max_tokens,
                    device=opts.device,
                    checkpoint_every=opts.checkpoint_every,
                    resume=opts.resume,
                )
                return distill(ctx, opts.ref, options, opts.texts)
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
