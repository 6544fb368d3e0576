"""The bench's report: the lines it prints, bench.json and the plot (throughput and p99 latency by concurrency; with
--api generate, tokens/s and the per-token latencies by concurrency, and the acceptance figures)."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.common.settings import usable_cpus


def plot(results: list[dict[str, Any]], ceiling: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows_of = medians(results) if len({r.get("round", 1) for r in results}) > 1 else results
    series = sorted({(r["api"], r["model"], r.get("target", ""), r["texts_per_request"]) for r in rows_of})
    for api, model, target, size in series:
        rows = sorted(
            (
                r
                for r in rows_of
                if (r["api"], r["model"], r.get("target", ""), r["texts_per_request"]) == (api, model, target, size)
            ),
            key=lambda r: r["concurrency"],
        )
        xs = [r["concurrency"] for r in rows]
        name = f"{size} text(s)/request" if len(series) <= 2 else f"{api} {model} {target} n={size}"
        left.plot(xs, [r["texts_per_s"] for r in rows], marker="o", label=name)
        right.plot(xs, [r["p99_ms"] for r in rows], marker="o", label=name)
    left.axhline(ceiling, color="grey", linestyle="--", label="bare model ceiling")
    for axis, title in ((left, "throughput (texts/s)"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


_MEDIAN_FIELDS = ("texts_per_s", "ratio_to_bare", "ratio_to_bare_beside", "p50_ms", "p90_ms", "p99_ms")


def medians(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell (api, model, target, concurrency, texts per request): each figure's median over its rounds."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        key = (r["api"], r["model"], r.get("target", ""), r["concurrency"], r["texts_per_request"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (api, model, target, concurrency, size), cells in groups.items():
        row: dict[str, Any] = {
            "api": api,
            "model": model,
            "target": target,
            "concurrency": concurrency,
            "texts_per_request": size,
            "rounds": len(cells),
        }
        for name in _MEDIAN_FIELDS:
            values = [c[name] for c in cells if not math.isnan(c[name])]
            row[name] = statistics.median(values) if values else float("nan")
        rows.append(row)
    return rows


def median_table(rows: list[dict[str, Any]], bare: dict[str, Any]) -> str:
    """The medians as a Markdown table, with each cell's p50 over the bare model's one-text p50."""
    single = bare.get("single_p50_ms", float("nan"))
    lines = [
        "| target | api | concurrency x texts | texts/s | x ceiling | x bare beside | p50 ms | p50 - bare p50 ms"
        " | p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['api']} | {r['concurrency']} x {r['texts_per_request']} | {r['texts_per_s']:.1f} | "
            f"{r['ratio_to_bare']:.2f} | {r['ratio_to_bare_beside']:.2f} | {r['p50_ms']:.2f} | "
            f"{r['p50_ms'] - single:+.2f} | {r['p99_ms']:.2f} |"
        )
    return "\n".join(lines)


def cell_line(label: str, summary: dict[str, Any], beside: bool) -> str:
    """One cell's line: throughput, its ratio to the bare ceiling, latency percentiles and status codes; with
    `beside`, also its ratio to the bare model measured around it."""
    return (
        f"{label}  {summary['texts_per_s']:8.1f} texts/s  "
        f"x{summary['ratio_to_bare']:.2f} bare  p50 {summary['p50_ms']:7.2f}  p90 {summary['p90_ms']:7.2f}  "
        f"p99 {summary['p99_ms']:7.2f} ms  codes {summary['codes']}"
        + (
            f"  (x{summary['ratio_to_bare_beside']:.2f} of the bare model beside it: "
            f"{summary['bare_beside_texts_per_s']:.1f} texts/s)"
            if beside
            else ""
        )
    )


def ratio_line(result: dict[str, Any], ceiling: float, several_models: bool, several_targets: bool = False) -> str:
    """A cell's line again once the ceiling is the best of the bare measurements before and after the cells."""
    model = f" {result['model']}" if several_models else ""
    if several_targets:
        model += f" {result.get('target', '')}"
    if result.get("round", 1) > 1 or several_targets:
        model += f" round {result.get('round', 1)}"
    return (
        f"{result['api']:<6} c={result['concurrency']:<4} n={result['texts_per_request']:<3}{model}  "
        f"{result['texts_per_s']:8.1f} texts/s  x{result['ratio_to_bare']:.2f} bare "
        f"(ceiling {ceiling:.1f})"
        + (f"  x{result['ratio_to_bare_beside']:.2f} beside" if not math.isnan(result["ratio_to_bare_beside"]) else "")
    )


def write(
    out: Path,
    settings: dict[str, str],
    bare: dict[str, Any],
    bare_by_model: dict[str, dict[str, Any]],
    results: list[dict[str, Any]],
    *,
    extra: dict[str, Any] | None = None,
    draw: Callable[[Path], None] | None = None,
) -> None:
    """bench.json (the machine, the settings, the bare model's figures and every cell's, and `extra`'s keys) and
    bench.png (drawn by `draw`, by default the encoder APIs' plot)."""
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {"cpus": os.cpu_count(), "usable_cpus": usable_cpus(), "uname": " ".join(os.uname())},
        "settings": settings,
        "bare": bare,
        "bare_by_model": bare_by_model,
        "results": results,
        **(extra or {}),
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    if draw is None:
        plot(results, bare.get("ceiling_texts_per_s", 0.0), out / "bench.png")
    else:
        draw(out / "bench.png")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")


# --api generate ------------------------------------------------------------------------------------------------------

# The acceptance figures of the generation work, as (key, what, target, met?).
ACCEPTANCE: tuple[tuple[str, str, str, Callable[[float], bool]], ...] = (
    ("c16_vs_bare_batched", "tokens/s at c=16 over bare batched generate() (batch 16)", ">= 0.8x", lambda v: v >= 0.8),
    ("c16_vs_bare_single", "tokens/s at c=16 over bare one-at-a-time generate()", ">= 4x", lambda v: v >= 4.0),
    (
        "c16_vs_bare_continuous",
        "tokens/s at c=16 over transformers' continuous batching (generate_batch) of the largest level's prompts",
        ">= 0.8x",
        lambda v: v >= 0.8,
    ),
    ("c1_itl_over_bare_ms", "ITL p50 at c=1 minus bare per-token decode time", "<= 1.5 ms", lambda v: v <= 1.5),
    (
        "c1_ttft_over_bare_ms",
        "TTFT at c=1 minus bare prefill time (each the best of two)",
        "<= 6 ms",
        lambda v: v <= 6.0,
    ),
)


def bare_generation_line(bare: dict[str, Any]) -> str:
    batched = ", ".join(f"batch {size} {rate:.1f}" for size, rate in bare["batched_tokens_per_s"].items())
    if "continuous_tokens_per_s" in bare:
        batched += f"; continuous batching (generate_batch) {bare['continuous_tokens_per_s']:.1f}"
    return (
        f"bare: prompts {bare['prompt_tokens_min']}-{bare['prompt_tokens_max']} tokens "
        f"(median {bare['prompt_tokens_median']:g}); one at a time {bare['single_tokens_per_s']:.1f} tokens/s "
        f"({bare['single_prompts']} prompts); batched {batched} tokens/s; batch 1 on the median prompt "
        f"({bare['median_prompt_tokens']} tokens): prefill {bare['prefill_ms']:.2f} ms, "
        f"per token {bare['per_token_ms']:.2f} ms"
    )


def generate_line(label: str, summary: dict[str, Any], bare: dict[str, Any]) -> str:
    """One level's line as it ends: tokens/s, and its ratios when the bare model was measured before it."""
    ratios = ""
    if bare:
        single = summary["tokens_per_s"] / bare["single_tokens_per_s"]
        batch = bare["batched_tokens_per_s"].get(str(summary["concurrency"]))
        ratios = f"  x{single:.2f} one-at-a-time" + (
            f"  x{summary['tokens_per_s'] / batch:.2f} batched" if batch else ""
        )
    return (
        f"{label}  {summary['tokens_per_s']:8.1f} tokens/s{ratios}  TTFT p50 {summary['ttft_p50_ms']:.2f} "
        f"p99 {summary['ttft_p99_ms']:.2f} ms  ITL p50 {summary['itl_p50_ms']:.2f} p99 {summary['itl_p99_ms']:.2f} ms"
        f"  {summary['requests']} done  errors {summary['errors'] or 'none'}"
        + (f"  {summary['short_answers']} SHORT" if summary["short_answers"] else "")
        + f"  (load {summary['load_average'][0]:.2f} at the start)"
    )


def _cell(value: float, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def generate_table(results: list[dict[str, Any]], bare: dict[str, Any]) -> str:
    """The levels as a Markdown table; the bare model's figures under it."""
    lines = [
        "| concurrency | tokens/s | x bare one-at-a-time | x bare batched | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
        "| ITL p99 ms | requests | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        errors = ", ".join(f"{code} {n}" for code, n in r["errors"].items()) or "none"
        lines.append(
            f"| {r['concurrency']} | {r['tokens_per_s']:.1f} | {_cell(r.get('ratio_to_bare_single', math.nan))} "
            f"| {_cell(r.get('ratio_to_bare_batched', math.nan))} | {_cell(r['ttft_p50_ms'])} "
            f"| {_cell(r['ttft_p99_ms'])} | {_cell(r['itl_p50_ms'])} | {_cell(r['itl_p99_ms'])} | {r['requests']} "
            f"| {errors} |"
        )
    if bare:
        lines.append("")
        lines.append(bare_generation_line(bare) + " (the best of the measurements before and after the levels)")
        for r in results:
            notes = []
            if r.get("prompt_token_mismatches"):
                mismatches = r["prompt_token_mismatches"]
                notes.append(f"prompt token counts differ from the bare tokenizer's for prompts {mismatches}")
            if r.get("answers_compared"):
                notes.append(f"answers equal to bare generate(): {r['answers_equal_to_bare']}/{r['answers_compared']}")
            if r["short_answers"]:
                notes.append(f"{r['short_answers']} answers shorter than max_new_tokens")
            if notes:
                lines.append(f"c={r['concurrency']}: " + "; ".join(notes))
    return "\n".join(lines)


def generate_acceptance(
    results: list[dict[str, Any]], bare: dict[str, Any], paired: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """The acceptance figures (ACCEPTANCE) the grid allows: c=16 against bare batched and one-at-a-time, and c=1's
    ITL and TTFT over the bare per-token and prefill times: from the paired rounds when there are some (the
    medians of per-prompt differences, bare and served interleaved), else the c=1 level's p50s against the bare
    model measured before and after the levels."""
    by_level = {r["concurrency"]: r for r in results}
    values: dict[str, float] = {}
    if 16 in by_level:
        values["c16_vs_bare_batched"] = by_level[16]["ratio_to_bare_batched"]
        values["c16_vs_bare_single"] = by_level[16]["ratio_to_bare_single"]
        values["c16_vs_bare_continuous"] = by_level[16].get("ratio_to_bare_continuous", math.nan)
    if paired:
        values["c1_itl_over_bare_ms"] = paired["itl_minus_bare_per_token_ms"]
        values["c1_ttft_over_bare_ms"] = paired["ttft_minus_bare_prefill_ms"]
    elif 1 in by_level:
        values["c1_itl_over_bare_ms"] = by_level[1]["itl_p50_minus_bare_per_token_ms"]
        values["c1_ttft_over_bare_ms"] = by_level[1]["ttft_p50_minus_bare_prefill_ms"]
    how = f" (median of {len(paired['rounds'])} paired rounds)" if paired else ""
    return {
        key: {
            "what": what + (how if key.startswith("c1_") else ""),
            "value": values[key],
            "target": target,
            "met": bool(met(values[key])),
        }
        for key, what, target, met in ACCEPTANCE
        if key in values and not math.isnan(values[key])
    }


def acceptance_lines(acceptance: dict[str, dict[str, Any]]) -> list[str]:
    return [
        f"{'meets' if a['met'] else 'MISSES'}: {a['what']}: {a['value']:.2f} (target {a['target']})"
        for a in acceptance.values()
    ]


def plot_generate(results: list[dict[str, Any]], bare: dict[str, Any], path: Path) -> None:
    """Tokens/s by concurrency beside the bare model's, and TTFT and ITL p50/p99 by concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [r["concurrency"] for r in results]
    left.plot(xs, [r["tokens_per_s"] for r in results], marker="o", label="Tandem Generate")
    if bare:
        left.axhline(bare["single_tokens_per_s"], color="grey", linestyle=":", label="bare one at a time")
        sizes = sorted(int(size) for size in bare["batched_tokens_per_s"])
        left.plot(
            sizes, [bare["batched_tokens_per_s"][str(s)] for s in sizes], "s--", color="grey", label="bare batched"
        )
    for key, name in (("ttft", "TTFT"), ("itl", "ITL")):
        for q, style in (("p50", "-"), ("p99", "--")):
            right.plot(xs, [r[f"{key}_{q}_ms"] for r in results], style, marker="o", label=f"{name} {q}")
    right.set_yscale("log")
    for axis, title in ((left, "generated tokens/s"), (right, "latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent streams")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
