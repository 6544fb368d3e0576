"""`tandem bench` against live servers: every API mode completes, counts its texts and reports only OK codes."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

from tandem.bench import run as bench
from tandem.bench.bare import BareBeside
from tandem.gateway.v1 import gateway_pb2
from tests.harness import Stack


async def test_bench_runs_every_api_and_writes_results(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = [
        "--target",
        stack.gateway.address,
        "--model",
        "tiny-embed,tiny-embed-cls",
        "--api",
        "embed,stream,oip",
        "--concurrency",
        "1,3",
        "--texts-per-request",
        "1,4",
        "--texts-per-cell",
        "12",
        "--skip-bare",
        "--out",
        str(out),
    ]
    assert await asyncio.to_thread(bench.main, argv) == 0
    report = json.loads((out / "bench.json").read_text())
    rows = report["results"]
    assert {(r["model"], r["api"], r["concurrency"], r["texts_per_request"]) for r in rows} == {
        (m, a, c, n)
        for m in ("tiny-embed", "tiny-embed-cls")
        for a in ("embed", "stream", "oip")
        for c in (1, 3)
        for n in (1, 4)
    }
    for row in rows:
        expected_requests = max(row["concurrency"] * 4, 12 // row["texts_per_request"])
        assert row["codes"] == {"OK": expected_requests}, row
        assert row["requests"] == expected_requests
        assert row["texts_per_s"] > 0
    assert (out / "bench.png").stat().st_size > 0


async def test_bench_compares_two_targets_cell_by_cell_over_rounds(stack: Stack, tmp_path: Path) -> None:
    """Two deployments (here: the stack's gateway under two labels) in one run, each cell back to back, twice."""
    out = tmp_path / "bench"
    address = stack.gateway.address
    argv = [
        "--target",
        f"one={address},two={address}",
        "--model",
        "tiny-embed",
        "--concurrency",
        "1,2",
        "--texts-per-request",
        "1",
        "--texts-per-cell",
        "8",
        "--rounds",
        "2",
        "--skip-bare",
        "--out",
        str(out),
    ]
    assert await asyncio.to_thread(bench.main, argv) == 0
    report = json.loads((out / "bench.json").read_text())
    order = [(r["round"], r["concurrency"], r["target"]) for r in report["results"]]
    assert order == [(k, c, t) for k in (1, 2) for c in (1, 2) for t in ("one", "two")]
    assert all(set(r["codes"]) == {"OK"} for r in report["results"])
    medians = {(m["target"], m["concurrency"]): m for m in report["medians"]}
    assert set(medians) == {(t, c) for t in ("one", "two") for c in (1, 2)}
    assert all(m["rounds"] == 2 and m["texts_per_s"] > 0 for m in medians.values())


async def test_bench_measures_the_bare_model_beside_every_cell(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the bare model measured (the tiny models' ONNX graphs, exported by the stack's inference stage), the bare
    model is also measured between cells: each cell gets the faster of the measurements just before and after it,
    and a cell after another model's cell gets a fresh one of its own model."""
    for model in ("tiny-embed", "tiny-embed-cls"):  # exported by now
        await stack.stub.Embed(gateway_pb2.EmbedRequest(model=model, inputs=["exported first"]))
    real_measure = BareBeside.measure
    figures: list[float] = []
    measured: list[float] = []

    def measure(self: BareBeside) -> float:
        assert real_measure(self) > 0  # the real measurement runs; the figure it reports is one the test knows
        measured.append(figures.pop(0))
        return measured[-1]

    monkeypatch.setattr(BareBeside, "measure", measure)
    out = tmp_path / "bench"

    def argv(models: str, *extra: str) -> list[str]:
        return [
            *("--target", stack.gateway.address, "--model", models, "--model-repository", str(stack.repository)),
            *("--concurrency", "1,2", "--texts-per-request", "2", "--texts-per-cell", "8", "--corpus", "32"),
            *("--bare-batch", "8", "--out", str(out), *extra),
        ]

    def results() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads((out / "bench.json").read_text())["results"]
        return rows

    # Two models: cells alternate between them, so every cell gets a fresh measurement before it and one after.
    figures[:] = [100.0, 200.0, 300.0, 150.0, 500.0, 400.0, 250.0, 260.0]
    assert await asyncio.to_thread(bench.main, argv("tiny-embed,tiny-embed-cls")) == 0
    rows = results()
    assert [(r["model"], r["concurrency"]) for r in rows] == [
        ("tiny-embed", 1),
        ("tiny-embed-cls", 1),
        ("tiny-embed", 2),
        ("tiny-embed-cls", 2),
    ]
    assert len(measured) == 8 and not figures
    assert [r["bare_beside_texts_per_s"] for r in rows] == [200.0, 300.0, 500.0, 260.0]  # the faster of each pair
    for row in rows:
        assert math.isclose(row["ratio_to_bare_beside"], row["texts_per_s"] / row["bare_beside_texts_per_s"])
    # One model: the measurement between its two cells serves as the after of one and the before of the next.
    measured.clear()
    figures[:] = [100.0, 300.0, 200.0]
    assert await asyncio.to_thread(bench.main, argv("tiny-embed", "--no-bare-after")) == 0
    assert len(measured) == 3
    assert [r["bare_beside_texts_per_s"] for r in results()] == [300.0, 300.0]
    # Without the measurements between cells, the fields say so instead of holding a made-up figure.
    measured.clear()
    assert await asyncio.to_thread(bench.main, argv("tiny-embed", "--no-bare-beside", "--no-bare-after")) == 0
    assert not measured
    assert all(math.isnan(r["ratio_to_bare_beside"]) for r in results())
