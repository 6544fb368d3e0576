"""`tandem bench`: closed-loop load on a running gateway, and the bare model measured in-process in the same run.

This module reads the arguments and runs the grid; corpus.py makes the texts, load.py drives the gateway, bare.py
measures the model alone, report.py prints and writes the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.common.settings import usable_cpus
from tandem.bench import report
from tandem.bench.bare import BareBeside, combine_bare, measure_bare
from tandem.bench.corpus import make_texts
from tandem.bench.load import APIS, Cell, Probe, ProbeSettings, run_cell

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
    parser.add_argument("--target", default="127.0.0.1:50051", help="gateway address")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL_NAME, help="model reference, or several comma-separated (compared in one run)"
    )
    parser.add_argument(
        "--api",
        default="embed",
        help="comma-separated: embed (unary Embed), stream (one EmbedStream, concurrency = requests in flight), "
        "oip (Open Inference Protocol ModelInfer)",
    )
    parser.add_argument("--model-repository", type=Path, default=None, help="default: the built-in repository")
    parser.add_argument("--home", type=Path, default=default_home())
    parser.add_argument("--concurrency", default="1,4,32", help="comma-separated grid")
    parser.add_argument("--texts-per-request", default="1,32", help="comma-separated grid")
    parser.add_argument("--texts", choices=("short", "mixed"), default="short")
    parser.add_argument("--corpus", type=int, default=512, help="distinct texts")
    parser.add_argument("--texts-per-cell", type=int, default=1024, help="texts sent in each grid cell (at least)")
    parser.add_argument("--deadline-s", type=float, default=30.0)
    parser.add_argument("--bare-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=usable_cpus(), help="bare model's ONNX threads")
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
    opts = parser.parse_args(argv)
    credentials = None
    if opts.tls_ca is not None or opts.tls_cert is not None:
        from tandem.sdk import tls_credentials

        try:
            credentials = tls_credentials(opts.tls_ca, opts.tls_cert, opts.tls_key)
        except (OSError, ValueError) as exc:
            parser.error(f"TLS: {exc}")

    texts = make_texts(opts.texts, opts.corpus)
    models = [m.strip() for m in opts.model.split(",") if m.strip()]
    apis = [a.strip() for a in opts.api.split(",") if a.strip()]
    unknown = sorted(set(apis) - set(APIS))
    if unknown:
        parser.error(f"unknown --api {', '.join(unknown)}: choose from {', '.join(APIS)}")
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
    grid = [
        (model, api, c, n)
        for n in _grid(opts.texts_per_request)
        for c in _grid(opts.concurrency)
        for model in models
        for api in apis
    ]
    for model, api, concurrency, size in grid:
        requests = max(concurrency * 4, opts.texts_per_cell // size)
        cell = Cell(concurrency, size, api, model)
        label = f"{api:<6} c={concurrency:<4} n={size:<3}" + (f" {model}" if len(models) > 1 else "")
        probe = (
            Probe(
                ProbeSettings(
                    opts.target,
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
                    opts.target,
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
            print(report.ratio_line(result, best, len(models) > 1), flush=True)
    report.write(opts.out, {k: str(v) for k, v in vars(opts).items()}, bare, bare_by_model, results)
    return 0
