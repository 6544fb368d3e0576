"""`tandem bench`: closed-loop load on a running gateway, and the bare model measured in-process in the same run.

This module reads the arguments and runs the grid; corpus.py makes the texts, load.py drives the gateway, bare.py
measures the model alone, report.py prints and writes the results. `--api generate` runs Generate streams instead
(generate.py, bare_generation.py; `run_generate` below).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.common.settings import usable_cpus
from tandem.bench import report
from tandem.bench.bare import BareBeside, combine_bare, measure_bare
from tandem.bench.corpus import PROMPT_WORDS, make_prompts, make_texts
from tandem.bench.load import APIS, Cell, Probe, ProbeSettings, run_cell

# Concurrency grids and deadlines by kind of API (--concurrency, --deadline-s unset).
ENCODER_CONCURRENCY, GENERATE_CONCURRENCY = "1,4,32", "1,8,16,32"
ENCODER_DEADLINE_S, GENERATE_DEADLINE_S = 30.0, 600.0

# The docstring's first line, as `tandem bench --help` shows it.
DESCRIPTION = (
    "`tandem bench`: closed-loop load on a running gateway, and the bare model measured in-process in the same run."
)


def _grid(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str]) -> int:
    from tqdm import tqdm

    from services.common.default_model import DEFAULT_MODEL_NAME
    from services.common.settings import default_home

    parser = argparse.ArgumentParser(prog="tandem bench", description=DESCRIPTION)
    parser.add_argument(
        "--target",
        default="127.0.0.1:50051",
        help="gateway address; or several, comma-separated and optionally labelled (separate=HOST:PORT,"
        "in-process=HOST:PORT), whose cells run back to back and are compared in one run (encoder APIs)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole grid this many times and report each cell's median over the rounds (encoder APIs)",
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL_NAME, help="model reference, or several comma-separated (compared in one run)"
    )
    parser.add_argument(
        "--api",
        default="embed",
        help="comma-separated: embed (unary Embed), stream (one EmbedStream, concurrency = requests in flight), "
        "oip (Open Inference Protocol ModelInfer); or generate alone (Generate streams of a text-generation model, "
        "see the generation options)",
    )
    parser.add_argument("--model-repository", type=Path, default=None, help="default: the built-in repository")
    parser.add_argument("--home", type=Path, default=default_home())
    parser.add_argument(
        "--concurrency",
        default=None,
        help=f"comma-separated grid (default {ENCODER_CONCURRENCY}; with --api generate {GENERATE_CONCURRENCY})",
    )
    parser.add_argument("--texts-per-request", default="1,32", help="comma-separated grid")
    parser.add_argument("--texts", choices=("short", "mixed"), default="short")
    parser.add_argument("--corpus", type=int, default=512, help="distinct texts")
    parser.add_argument("--texts-per-cell", type=int, default=1024, help="texts sent in each grid cell (at least)")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help=f"per request (default {ENCODER_DEADLINE_S:g}; with --api generate {GENERATE_DEADLINE_S:g}, per stream)",
    )
    parser.add_argument("--bare-batch", type=int, default=32)
    parser.add_argument(
        "--threads",
        type=int,
        default=usable_cpus(),
        help="bare model's ONNX threads; with --api generate its torch threads, which must be the inference stage's "
        "(its --intra-op-threads; default, like the stage's: the usable CPUs)",
    )
    parser.add_argument("--skip-bare", action="store_true")
    parser.add_argument(
        "--no-bare-after",
        dest="bare_after",
        action="store_false",
        help="measure the bare model only before the cells (default: before and after, the ceiling is the best)",
    )
    parser.add_argument(
        "--no-bare-beside",
        dest="bare_beside",
        action="store_false",
        help="do not measure the bare model quickly between the cells (default: measured, and each cell is also "
        "compared with the bare model just before and after it)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM CA of a gateway served with TLS")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate (gateway with mTLS)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", default=None, help="name the gateway's certificate is checked for")
    parser.add_argument("--api-key", default=None, help="sent as x-api-key when the gateway has keys")
    parser.add_argument(
        "--probe-interval-ms",
        type=float,
        default=0.0,
        help="also run a quiet probe client in its own process, one call every this many ms during each cell, and "
        "report what it saw (how fast refusals come back to a caller that is not itself overloaded); 0: off",
    )
    parser.add_argument(
        "--no-retry-info",
        dest="honor_retry_info",
        action="store_false",
        help="after a refusal, call again at once instead of waiting the RetryInfo delay the server asked for",
    )
    generation = parser.add_argument_group("generation (--api generate)")
    generation.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens every request generates (EOS ignored)"
    )
    generation.add_argument(
        "--prompts", type=int, default=32, help="distinct prompts; request i sends prompt i mod this"
    )
    generation.add_argument(
        "--prompt-words",
        default=f"{PROMPT_WORDS[0]},{PROMPT_WORDS[1]}",
        help="LOW,HIGH words a prompt has (uniform; about 10-60 tokens at the default with SmolLM2's tokenizer)",
    )
    generation.add_argument("--chat", action="store_true", help="send each prompt as one user message (chat template)")
    generation.add_argument("--requests-per-stream", type=int, default=4, help="requests each stream sends in a level")
    generation.add_argument("--min-requests", type=int, default=8, help="requests a level sends at least")
    generation.add_argument(
        "--bare-single-prompts", type=int, default=8, help="prompts the bare model generates one at a time"
    )
    generation.add_argument(
        "--bare-reps", type=int, default=3, help="bare prefill and per-token times: the best of this many runs"
    )
    generation.add_argument(
        "--bare-continuous",
        action="store_true",
        help="also measure transformers' continuous batching (generate_batch) on the largest level's worth of the "
        "prompts, and compare the levels with it",
    )
    generation.add_argument(
        "--paired-rounds",
        type=int,
        default=4,
        help="after the levels, this many single streams each right after the bare model on the same prompt; the "
        "medians of their differences are the c=1 acceptance figures (0: compare the c=1 level with the bare model "
        "measured before and after the levels instead)",
    )
    opts = parser.parse_args(argv)
    credentials = None
    if opts.tls_ca is not None or opts.tls_cert is not None:
        from tandem.sdk import tls_credentials

        try:
            credentials = tls_credentials(opts.tls_ca, opts.tls_cert, opts.tls_key)
        except (OSError, ValueError) as exc:
            parser.error(f"TLS: {exc}")

    models = [m.strip() for m in opts.model.split(",") if m.strip()]
    apis = [a.strip() for a in opts.api.split(",") if a.strip()]
    unknown = sorted(set(apis) - {*APIS, "generate"})
    if unknown:
        parser.error(f"unknown --api {', '.join(unknown)}: choose from {', '.join((*APIS, 'generate'))}")
    if "generate" in apis:
        if len(apis) > 1:
            parser.error("--api generate runs alone (its levels and figures differ from the encoder APIs')")
        if opts.model == DEFAULT_MODEL_NAME or len(models) != 1:
            parser.error("--api generate needs --model: one text-generation model of the server's repository")
        if not opts.skip_bare and opts.model_repository is None:
            parser.error("--api generate measures the bare model from --model-repository (or give --skip-bare)")
        try:
            low, high = _grid(opts.prompt_words)
            prompts = make_prompts(opts.prompts, (low, high))
        except ValueError as exc:
            parser.error(f"--prompt-words: {exc}")
        if opts.max_new_tokens < 2:
            parser.error("--max-new-tokens must be 2 or more (the bare per-token time needs two)")
        small = [
            name
            for name in ("prompts", "requests_per_stream", "min_requests", "bare_single_prompts", "bare_reps")
            if getattr(opts, name) < 1
        ]
        if small:
            parser.error(", ".join(f"--{name.replace('_', '-')}" for name in small) + ": 1 or more")
        opts.concurrency = opts.concurrency or GENERATE_CONCURRENCY
        opts.deadline_s = opts.deadline_s or GENERATE_DEADLINE_S
        return run_generate(opts, models[0], prompts, credentials)
    opts.concurrency = opts.concurrency or ENCODER_CONCURRENCY
    opts.deadline_s = opts.deadline_s or ENCODER_DEADLINE_S
    try:
        targets = parse_targets(opts.target)
    except ValueError as exc:
        parser.error(f"--target: {exc}")
    if opts.rounds < 1:
        parser.error("--rounds: 1 or more")
    texts = make_texts(opts.texts, opts.corpus)
    bare_by_model: dict[str, dict[str, Any]] = {}
    if not opts.skip_bare:
        from services.common.default_model import ensure_default_repository

        repository = opts.model_repository or ensure_default_repository(opts.home)
        for model in models:
            bare_by_model[model] = measure_bare(repository, model, texts, opts.threads, opts.bare_batch)
    bare = bare_by_model.get(models[0], {})
    beside = (
        {model: BareBeside(repository, model, texts, opts.threads, opts.bare_batch) for model in models}
        if bare_by_model and opts.bare_beside
        else {}
    )
    # The bare model's speed measured right after the previous cell, and that cell's model.
    last_beside = 0.0
    last_model = ""
    results = []
    # Cells that are compared with each other (models, APIs at one concurrency and size) run back to back, so a
    # change in the machine's background load affects them alike.
    # Targets (deployments) too: with --rounds, the whole grid again, so every cell has as many measurements.
    grid = [
        (model, api, c, n, target, round_)
        for round_ in range(opts.rounds)
        for n in _grid(opts.texts_per_request)
        for c in _grid(opts.concurrency)
        for model in models
        for api in apis
        for target in targets
    ]
    for model, api, concurrency, size, (target_label, target), round_ in grid:
        requests = max(concurrency * 4, opts.texts_per_cell // size)
        cell = Cell(concurrency, size, api, model, target=target_label)
        label = (
            f"{api:<6} c={concurrency:<4} n={size:<3}"
            + (f" {model}" if len(models) > 1 else "")
            + (f" {target_label}" if len(targets) > 1 else "")
            + (f" round {round_ + 1}" if opts.rounds > 1 else "")
        )
        probe = (
            Probe(
                ProbeSettings(
                    target,
                    model,
                    texts[0],
                    opts.probe_interval_ms / 1000,
                    opts.deadline_s,
                    opts.tls_ca,
                    opts.tls_cert,
                    opts.tls_key,
                    opts.tls_server_name,
                    opts.api_key,
                )
            )
            if opts.probe_interval_ms > 0
            else None
        )
        if model in beside and model != last_model:
            # Measured after a cell of another model (or none yet): measure this one now.
            last_beside = beside[model].measure()
        with tqdm(total=requests, desc=label, leave=False, unit="req") as progress, probe or contextlib.nullcontext():
            asyncio.run(
                run_cell(
                    target,
                    model,
                    texts,
                    cell,
                    requests,
                    opts.deadline_s,
                    progress,
                    credentials,
                    opts.tls_server_name,
                    opts.api_key,
                    opts.honor_retry_info,
                )
            )
        nearby: list[float] = []
        if model in beside:
            # The measurement after this cell is also the one before the next cell, when that is of the same model.
            nearby = [last_beside, beside[model].measure()]
            last_beside, last_model = nearby[1], model
        summary = cell.summary(bare_by_model.get(model, {}).get("ceiling_texts_per_s", 0.0), nearby)
        summary["round"] = round_ + 1
        if probe is not None:
            summary["probe"] = probe.summary()
            print(f"{label}  probe: {summary['probe']}", flush=True)
        results.append(summary)
        print(report.cell_line(label, summary, bool(nearby)), flush=True)
    if bare_by_model and opts.bare_after:
        print("the bare model again, after the cells:", flush=True)
        for model in models:
            again = measure_bare(repository, model, texts, opts.threads, opts.bare_batch)
            bare_by_model[model] = combine_bare([bare_by_model[model], again])
        bare = bare_by_model[models[0]]
        for result in results:
            best = bare_by_model[result["model"]]["ceiling_texts_per_s"]
            result["ratio_to_bare"] = result["texts_per_s"] / best
        print("ratios to the best of both ceilings:", flush=True)
        for result in results:
            best = bare_by_model[result["model"]]["ceiling_texts_per_s"]
            print(report.ratio_line(result, best, len(models) > 1, len(targets) > 1), flush=True)
    medians = report.medians(results) if opts.rounds > 1 or len(targets) > 1 else []
    if medians:
        single = bare.get("single_p50_ms", float("nan"))
        print(f"medians over {opts.rounds} round(s); the bare model's p50 for one text {single:.2f} ms:")
        print(report.median_table(medians, bare), flush=True)
    extra = {"medians": medians} if medians else None
    report.write(opts.out, {k: str(v) for k, v in vars(opts).items()}, bare, bare_by_model, results, extra=extra)
    return 0


def parse_targets(text: str) -> list[tuple[str, str]]:
    """'a=HOST:PORT,b=unix:PATH' or 'HOST:PORT' -> [(label, address)]; an address without a label is its own label."""
    targets: list[tuple[str, str]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        label, sep, address = part.partition("=")
        if not sep:
            label, address = part, part
        if not label or not address:
            raise ValueError(f"bad target {part!r}: use HOST:PORT or LABEL=HOST:PORT")
        targets.append((label, address))
    if not targets:
        raise ValueError("no target given")
    if len({label for label, _ in targets}) != len(targets):
        raise ValueError("every target needs its own label")
    return targets


def _load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {usable_cpus()} usable CPUs"


def run_generate(opts: argparse.Namespace, model: str, prompts: list[str], credentials: Any) -> int:
    """`--api generate`: the bare model before the levels, the levels one after the other, the bare model again after
    them (the best of both counts), then the table, the acceptance figures and bench.json."""
    import grpc
    from tqdm import tqdm

    from tandem.bench.bare_generation import combine_bare_generation, measure_bare_generation
    from tandem.bench.generate import Connection, Level, compare_with_bare, run_level, warm_up

    levels = _grid(opts.concurrency)
    batches = sorted({c for c in levels if c >= 16} | {16})
    print(
        f"tandem bench --api generate: {model}, {len(prompts)} prompts, {opts.max_new_tokens} new tokens each "
        f"(greedy, EOS ignored), concurrency {levels}; {_load_line()}",
        flush=True,
    )
    free = usable_cpus() - os.getloadavg()[0]
    if not opts.skip_bare and opts.threads > max(1.0, free + 0.5):
        print(
            f"warning: {opts.threads} torch threads but about {max(free, 0.0):.1f} free CPUs: above the free cores "
            "SDPA waits for descheduled threads and generate() slows down many times, which flatters the ratios "
            "(docs/design/generation-research.md); prefer a quiet machine, or --threads 1 with the inference "
            "stage's --intra-op-threads 1",
            flush=True,
        )
    version_dir: Path | None = None
    bare_dtype, bare_device = "float32", "cpu"
    bare: dict[str, Any] = {}

    def measure(when: str) -> dict[str, Any]:
        assert version_dir is not None
        print(f"bare model {when} the levels ({opts.threads} torch threads; {_load_line()}) ...", flush=True)
        run = measure_bare_generation(
            version_dir,
            prompts,
            threads=opts.threads,
            max_new_tokens=opts.max_new_tokens,
            single_prompts=opts.bare_single_prompts,
            batches=batches,
            reps=opts.bare_reps,
            chat=opts.chat,
            dtype=bare_dtype,
            device=bare_device,
            continuous=opts.bare_continuous,
        )
        print(report.bare_generation_line(run), flush=True)
        return run

    if not opts.skip_bare:
        from services.common.repository import ModelRepository

        version = ModelRepository(opts.model_repository).resolve(model)
        version_dir = version.path
        bare_dtype, bare_device = version.config.dtype, version.config.device
        bare = measure("before")
        bare["version"] = version.version
    connection = Connection(opts.target, credentials, opts.tls_server_name, opts.api_key)
    try:
        asyncio.run(warm_up(connection, model, prompts[0], opts.chat))
    except grpc.aio.AioRpcError as exc:
        print(f"tandem bench: the warm-up Generate failed: {exc.code().name}: {exc.details()}", flush=True)
        return 1
    results: list[dict[str, Any]] = []
    runs: list[Level] = []
    for concurrency in levels:
        requests = max(concurrency * opts.requests_per_stream, opts.min_requests)
        level = Level(concurrency, model, opts.max_new_tokens, load_average=os.getloadavg())
        label = f"generate c={concurrency:<4}"
        with tqdm(total=requests, desc=label, leave=False, unit="req") as progress:
            asyncio.run(
                run_level(
                    connection, prompts, level, requests, opts.deadline_s, progress, opts.chat, opts.honor_retry_info
                )
            )
        runs.append(level)
        results.append(level.summary())
        print(report.generate_line(label, results[-1], bare), flush=True)
    if bare and opts.bare_after:
        bare = combine_bare_generation([bare, measure("after")])
    paired: dict[str, Any] | None = None
    if bare and version_dir is not None and opts.paired_rounds > 0:
        paired = _paired_rounds(opts, connection, model, prompts, version_dir, bare_dtype, bare_device)
    served = sorted({v for result in results for v in result["served_versions"]})
    if bare and served != [bare["version"]]:
        print(f"warning: the server answered with version(s) {served}, the bare model is version {bare['version']}")
    if bare:
        for level, result in zip(runs, results, strict=True):
            result.update(compare_with_bare(level, bare))
    print(report.generate_table(results, bare), flush=True)
    acceptance = report.generate_acceptance(results, bare, paired) if bare else {}
    for line in report.acceptance_lines(acceptance):
        print(line, flush=True)
    print(_load_line(), flush=True)
    bare_json = {k: v for k, v in bare.items() if k != "answers"}
    report.write(
        opts.out,
        {k: str(v) for k, v in vars(opts).items()},
        bare_json,
        {model: bare_json} if bare else {},
        results,
        extra={
            "api": "generate",
            "acceptance": acceptance,
            "paired_c1": paired,
            "load_average_end": list(os.getloadavg()),
        },
        draw=lambda path: report.plot_generate(results, bare_json, path),
    )
    return 0


def _paired_rounds(
    opts: argparse.Namespace,
    connection: Any,
    model: str,
    prompts: list[str],
    version_dir: Path,
    dtype: str,
    device: str,
) -> dict[str, Any]:
    """Concurrency 1, bare and served interleaved on the same prompts (bare_generation.measure_paired)."""
    import statistics

    from tandem.bench.bare_generation import BareCausalLM, measure_paired
    from tandem.bench.generate import Level, open_channel, run_level, warm_up

    class _Quiet:
        def update(self, _: int) -> None:
            pass

    print(f"c=1 paired with the bare model, {opts.paired_rounds} rounds ...", flush=True)
    lm = BareCausalLM(version_dir, opts.threads, opts.chat, dtype, device)
    # One event loop and one connected channel for every round, as a client that keeps its connection does: a
    # channel per round would add connecting to each stream's time to first token.
    with asyncio.Runner() as runner:
        channel = runner.run(_opened(open_channel, connection))

        def served(prompt: str) -> tuple[float, float]:
            level = Level(1, model, opts.max_new_tokens)
            runner.run(
                run_level(
                    connection, [prompt], level, 1, opts.deadline_s, _Quiet(), opts.chat, opts.honor_retry_info, channel
                )
            )
            if not level.ttft_ms or not level.itl_ms:
                raise SystemExit(f"tandem bench: a paired stream failed: {dict(level.codes)}")
            return level.ttft_ms[0] / 1000, statistics.median(level.itl_ms) / 1000

        try:
            runner.run(warm_up(connection, model, prompts[0], opts.chat, channel))
            paired = measure_paired(lm, prompts, opts.max_new_tokens, served, opts.paired_rounds)
        finally:
            runner.run(channel.close())
    for row in paired["rounds"]:
        print(
            "  prompt {prompt_tokens} tokens: bare prefill {bare_prefill_ms:.1f} ms, per token "
            "{bare_per_token_ms:.2f} ms | served TTFT {ttft_ms:.1f} ms (best of two; first {ttft_first_ms:.1f}), "
            "ITL p50 {itl_p50_ms:.2f} ms".format(**row),
            flush=True,
        )
    print(
        f"paired medians: TTFT - bare prefill {paired['ttft_minus_bare_prefill_ms']:+.2f} ms (each side the best of"
        f" two; the first served stream alone {paired['first_ttft_minus_bare_prefill_ms']:+.2f} ms), "
        f"ITL - bare per token {paired['itl_minus_bare_per_token_ms']:+.2f} ms",
        flush=True,
    )
    return paired


async def _opened(open_channel: Any, connection: Any) -> Any:
    """The channel, made inside the runner's event loop (a grpc.aio channel belongs to the loop it is made in)."""
    return open_channel(connection)
