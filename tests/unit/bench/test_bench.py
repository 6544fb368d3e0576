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
