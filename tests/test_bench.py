"""`tandem bench` against live servers: every API mode completes, counts its texts and reports only OK codes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tandem import bench
from tests.conftest import Stack


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


def test_bench_refuses_an_unknown_api(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--api", "embed,rest", "--skip-bare", "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_retry_delay_reads_the_refusals_retry_info() -> None:
    import grpc
    from grpc_status import rpc_status

    from services.common import errors

    def refusal(err: errors.TandemError) -> grpc.aio.AioRpcError:
        status = rpc_status.to_status(err.to_status_proto())
        return grpc.aio.AioRpcError(
            status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata), status.details
        )

    assert bench.retry_delay(refusal(errors.resource_exhausted("busy", retry_after_s=0.25))) == 0.25
    assert bench.retry_delay(refusal(errors.invalid_argument("bad", "inputs"))) is None


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
    best = bench.combine_bare([before, after])
    assert best["ceiling_texts_per_s"] == 503.0
    assert best["sorted_batch_texts_per_s"] == 490.0 and best["single_texts_per_s"] == 190.0
    assert best["single_p50_ms"] == 3.4
    assert best["spinning"] == 0.0  # the setting of the measurement that gave the ceiling
    assert best["measurements"] == [before, after]
