"""The bench's report: the lines it prints, bench.json and the plot (throughput and p99 latency by concurrency)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from services.common.settings import usable_cpus


def plot(results: list[dict[str, Any]], ceiling: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = sorted({(r["api"], r["model"], r["texts_per_request"]) for r in results})
    for api, model, size in series:
        rows = sorted(
            (r for r in results if (r["api"], r["model"], r["texts_per_request"]) == (api, model, size)),
            key=lambda r: r["concurrency"],
        )
        xs = [r["concurrency"] for r in rows]
        name = f"{size} text(s)/request" if len(series) <= 2 else f"{api} {model} n={size}"
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


def ratio_line(result: dict[str, Any], ceiling: float, several_models: bool) -> str:
    """A cell's line again once the ceiling is the best of the bare measurements before and after the cells."""
    model = f" {result['model']}" if several_models else ""
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
) -> None:
    """bench.json (the machine, the settings, the bare model's figures and every cell's) and bench.png."""
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {"cpus": os.cpu_count(), "usable_cpus": usable_cpus(), "uname": " ".join(os.uname())},
        "settings": settings,
        "bare": bare,
        "bare_by_model": bare_by_model,
        "results": results,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    plot(results, bare.get("ceiling_texts_per_s", 0.0), out / "bench.png")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
