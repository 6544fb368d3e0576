"""`tandem bench` without servers: its arguments, and how results are combined (reading RetryInfo from refusals:
tests/unit/sdk/test_status.py, as the bench uses the SDK's decoder)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tandem.bench import run as bench
from tandem.bench.bare import combine_bare
from tandem.bench.load import Cell


def test_bench_refuses_an_unknown_api(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--api", "embed,rest", "--skip-bare", "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_the_ceiling_is_the_best_of_the_bare_measurements_before_and_after_the_cells() -> None:
    """A bare run that hit a slow moment must not flatter the ratios: rates take the highest, latency the lowest."""
    before = {
        "single_texts_per_s": 190.0,
        "single_p50_ms": 4.5,
        "naive_batch_texts_per_s": 300.0,
        "sorted_batch_texts_per_s": 420.0,
        "sorted_parallel_texts_per_s": 445.0,
        "ceiling_texts_per_s": 445.0,
        "spinning": 1.0,
    }
    after = {**before, "single_p50_ms": 3.4, "sorted_batch_texts_per_s": 490.0, "sorted_parallel_texts_per_s": 503.0}
    after.update(ceiling_texts_per_s=503.0, spinning=0.0, single_texts_per_s=180.0)
    best = combine_bare([before, after])
    assert best["ceiling_texts_per_s"] == 503.0
    assert best["sorted_batch_texts_per_s"] == 490.0 and best["single_texts_per_s"] == 190.0
    assert best["single_p50_ms"] == 3.4
    assert best["spinning"] == 0.0  # the setting of the measurement that gave the ceiling
    assert best["measurements"] == [before, after]


def test_each_cell_is_also_compared_with_the_bare_model_measured_beside_it() -> None:
    """The faster of the bare measurements just before and just after a cell counts (a slow moment of the host
    while the bare model ran must not flatter the cell); without them the fields are NaN, not a made-up ratio."""
    cell = Cell(concurrency=4, texts_per_request=32, texts=900, seconds=2.0)
    summary = cell.summary(500.0, [400.0, 450.0])
    assert summary["texts_per_s"] == 450.0
    assert summary["ratio_to_bare"] == 0.9
    assert summary["bare_beside_texts_per_s"] == 450.0
    assert summary["ratio_to_bare_beside"] == 1.0
    alone = cell.summary(500.0)
    assert math.isnan(alone["bare_beside_texts_per_s"]) and math.isnan(alone["ratio_to_bare_beside"])


def test_targets_are_labelled_addresses_and_each_label_is_unique() -> None:
    assert bench.parse_targets("127.0.0.1:1") == [("127.0.0.1:1", "127.0.0.1:1")]
    assert bench.parse_targets("a=127.0.0.1:1, b=unix:/tmp/s") == [("a", "127.0.0.1:1"), ("b", "unix:/tmp/s")]
    for bad, message in (("", "no target"), ("=x", "bad target"), ("a=x,a=y", "its own label")):
        with pytest.raises(ValueError, match=message):
            bench.parse_targets(bad)


def test_medians_are_per_cell_over_rounds() -> None:
    from tandem.bench import report

    def row(target: str, p50: float, rate: float) -> dict[str, object]:
        return {
            "api": "embed",
            "model": "m",
            "target": target,
            "concurrency": 1,
            "texts_per_request": 1,
            "texts_per_s": rate,
            "ratio_to_bare": rate / 100,
            "ratio_to_bare_beside": float("nan"),
            "p50_ms": p50,
            "p90_ms": p50,
            "p99_ms": p50,
        }

    rows = report.medians([row("a", 5, 10), row("b", 3, 30), row("a", 9, 20), row("a", 6, 90), row("b", 4, 40)])
    by_target = {r["target"]: r for r in rows}
    assert (by_target["a"]["p50_ms"], by_target["a"]["texts_per_s"], by_target["a"]["rounds"]) == (6, 20, 3)
    assert (by_target["b"]["p50_ms"], by_target["b"]["rounds"]) == (3.5, 2)
    assert math.isnan(by_target["a"]["ratio_to_bare_beside"])
    table = report.median_table(rows, {"single_p50_ms": 2.0})
    assert "| a | embed | 1 x 1 | 20.0 | 0.20 | nan | 6.00 | +4.00 | 6.00 |" in table
