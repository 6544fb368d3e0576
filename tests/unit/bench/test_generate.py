"""`tandem bench --api generate` without servers or models: the per-stream timings, a level's summary, the prompt
corpus, the comparison with the bare model, the acceptance figures and the arguments. No timing is measured here."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tandem.bench import report
from tandem.bench import run as bench
from tandem.bench.bare_generation import combine_bare_generation
from tandem.bench.corpus import PROMPT_WORDS, make_prompts
from tandem.bench.generate import Level, compare_with_bare, generate_request, stream_timings
from tandem.bench.load import percentile


def test_percentiles_interpolate_and_are_nan_without_values() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_time_to_first_token_runs_from_the_send_to_the_first_message_with_a_token() -> None:
    # A message with no token (text held back, say) does not end the wait for the first token.
    timings = stream_timings(10.0, [(10.004, 0), (10.010, 1), (10.020, 1)])
    assert timings.ttft_s == pytest.approx(0.010)
    assert timings.tokens == 2


def test_each_token_counts_once_in_the_inter_token_latency() -> None:
    """A message of n tokens after a gap g adds n latencies of g / n; messages without tokens are skipped (the gap
    runs from the previous message with tokens); the first message's extra tokens have no gap and add none."""
    arrivals = [(0.100, 2), (0.110, 1), (0.125, 0), (0.140, 3), (0.150, 1)]
    timings = stream_timings(0.0, arrivals)
    assert timings.ttft_s == pytest.approx(0.100)
    assert timings.tokens == 7
    assert timings.itl_s == pytest.approx([0.010, 0.010, 0.010, 0.010, 0.010])
    assert len(timings.itl_s) == timings.tokens - 2  # all but the first message's two


def test_a_stream_without_tokens_has_no_timings() -> None:
    assert stream_timings(1.0, []).ttft_s is None
    empty = stream_timings(1.0, [(1.5, 0)])
    assert (empty.ttft_s, empty.itl_s, empty.tokens) == (None, [], 0)


def test_a_level_counts_every_token_and_times_only_finished_streams() -> None:
    level = Level(concurrency=2, model="m", max_new_tokens=3, seconds=2.0)
    level.record(0.0, [(0.010, 1), (0.012, 1), (0.014, 1)], 0.015, "OK")
    level.record(1.0, [(1.020, 2), (1.026, 1)], 1.030, "OK")
    level.record(2.0, [(2.050, 1)], 2.060, "DEADLINE_EXCEEDED")  # its token counts; its timings do not
    level.record(3.0, [], 3.001, "RESOURCE_EXHAUSTED")
    level.record(4.0, [(4.010, 1)], 4.020, "OK")  # finished with 1 of 3 tokens
    summary = level.summary()
    assert summary["tokens"] == 3 + 3 + 1 + 0 + 1
    assert summary["tokens_per_s"] == 4.0
    assert summary["requests"] == 3
    assert summary["short_answers"] == 1
    assert summary["codes"] == {"OK": 3, "DEADLINE_EXCEEDED": 1, "RESOURCE_EXHAUSTED": 1}
    assert summary["errors"] == {"DEADLINE_EXCEEDED": 1, "RESOURCE_EXHAUSTED": 1}
    assert summary["ttft_p50_ms"] == pytest.approx(10.0)  # of 10, 20, 10
    assert summary["itl_p50_ms"] == pytest.approx(2.0)  # 2, 2 and 6 / 1
    assert summary["latency_p50_ms"] == pytest.approx(20.0)


def test_a_level_without_answers_reports_nan_not_zero() -> None:
    summary = Level(concurrency=1).summary()
    assert summary["tokens_per_s"] == 0.0
    assert math.isnan(summary["ttft_p50_ms"]) and math.isnan(summary["itl_p99_ms"])


def test_the_prompt_corpus_is_deterministic_and_within_its_word_range() -> None:
    prompts = make_prompts(64)
    assert prompts == make_prompts(64)
    assert make_prompts(8) == prompts[:8]  # a smaller corpus is a prefix of a larger one
    assert make_prompts(64, seed=1) != prompts
    low, high = PROMPT_WORDS
    assert all(low <= len(p.split()) <= high for p in prompts)
    assert len({len(p.split()) for p in prompts}) > 10  # lengths vary
    assert all(p[-1] in "?." for p in prompts)
    assert all(len(p.split()) in (3, 4) for p in make_prompts(16, (3, 4)))
    with pytest.raises(ValueError):
        make_prompts(1, (5, 4))


def test_every_request_is_greedy_and_generates_exactly_max_new_tokens() -> None:
    plain = generate_request("m", "Hello?", 64, chat=False)
    assert (plain.model, plain.prompt, list(plain.messages)) == ("m", "Hello?", [])
    assert plain.params.max_new_tokens == 64
    assert plain.params.ignore_eos and plain.params.temperature == 0.0
    chat = generate_request("m", "Hello?", 8, chat=True)
    assert chat.prompt == "" and [(m.role, m.content) for m in chat.messages] == [("user", "Hello?")]


def _bare(**changes: Any) -> dict[str, Any]:
    bare: dict[str, Any] = {
        "single_tokens_per_s": 10.0,
        "batched_tokens_per_s": {"16": 50.0, "32": 80.0},
        "prefill_ms": 20.0,
        "per_token_ms": 5.0,
        "prompt_tokens": [11, 12, 13],
        "answers": [[1, 2], [3, 4]],
    }
    return {**bare, **changes}


def test_a_level_is_compared_with_the_bare_model_of_its_batch_size() -> None:
    level = Level(concurrency=16, max_new_tokens=2, seconds=1.0)
    level.record(0.0, [(0.030, 1), (0.036, 1)], 0.04, "OK")
    level.tokens = 45  # as if more streams had run
    level.prompt_tokens = {0: 11, 1: 99, 2: 13}
    level.outputs = {0: [1, 2], 1: [3, 5], 2: [7, 7]}  # prompt 2 was not generated by the bare model one at a time
    compared = compare_with_bare(level, _bare())
    assert compared["ratio_to_bare_single"] == 4.5
    assert compared["ratio_to_bare_batched"] == 0.9
    assert compared["ttft_p50_minus_bare_prefill_ms"] == pytest.approx(10.0)
    assert compared["itl_p50_minus_bare_per_token_ms"] == pytest.approx(1.0)
    assert compared["prompt_token_mismatches"] == [1]
    assert (compared["answers_compared"], compared["answers_equal_to_bare"]) == (2, 1)
    # A level whose batch size the bare model did not run has no batched ratio.
    assert math.isnan(compare_with_bare(Level(concurrency=8, seconds=1.0), _bare())["ratio_to_bare_batched"])


def test_the_bare_figures_are_the_best_of_before_and_after() -> None:
    before = _bare(single_tokens_per_s=12.0, prefill_ms=25.0)
    after = _bare(batched_tokens_per_s={"16": 60.0, "32": 70.0}, per_token_ms=4.0)
    best = combine_bare_generation([before, after])
    assert best["single_tokens_per_s"] == 12.0
    assert best["batched_tokens_per_s"] == {"16": 60.0, "32": 80.0}
    assert (best["prefill_ms"], best["per_token_ms"]) == (20.0, 4.0)
    assert len(best["measurements"]) == 2 and "answers" not in best["measurements"][0]


def _result(concurrency: int, **figures: float) -> dict[str, Any]:
    return {"concurrency": concurrency, **figures}


def test_the_acceptance_figures_come_from_c16_and_c1() -> None:
    results = [
        _result(1, itl_p50_minus_bare_per_token_ms=1.2, ttft_p50_minus_bare_prefill_ms=7.5),
        _result(16, ratio_to_bare_batched=0.85, ratio_to_bare_single=3.9),
    ]
    acceptance = report.generate_acceptance(results, _bare())
    assert {key: a["met"] for key, a in acceptance.items()} == {
        "c16_vs_bare_batched": True,
        "c16_vs_bare_single": False,
        "c1_itl_over_bare_ms": True,
        "c1_ttft_over_bare_ms": False,
    }
    lines = report.acceptance_lines(acceptance)
    assert sum(line.startswith("MISSES") for line in lines) == 2
    # Levels that are not in the grid give no figure.
    assert report.generate_acceptance([_result(8, ratio_to_bare_batched=math.nan)], _bare()) == {}


def test_the_table_shows_a_missing_ratio_as_a_dash() -> None:
    summary = Level(concurrency=8, seconds=1.0).summary()
    table = report.generate_table([{**summary, "ratio_to_bare_single": 2.0, "ratio_to_bare_batched": math.nan}], {})
    row = table.splitlines()[2]
    assert row.startswith("| 8 | 0.0 | 2.00 | - |")


@pytest.mark.parametrize(
    "argv",
    [
        ["--api", "generate,embed", "--model", "m", "--skip-bare"],  # generate runs alone
        ["--api", "generate", "--skip-bare"],  # no --model: the default is an embedding model
        ["--api", "generate", "--model", "m"],  # the bare model needs the repository
        ["--api", "generate", "--model", "m", "--skip-bare", "--prompt-words", "9,3"],
        ["--api", "generate", "--model", "m", "--skip-bare", "--max-new-tokens", "1"],
    ],
)
def test_bench_refuses_generate_arguments_it_cannot_run(argv: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2


class _ClockedLM:
    """A bare model whose calls take known times (advancing a fake clock): prefill 100 ms, 10 ms a token."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock

    def encode(self, prompt: str) -> list[int]:
        return [1] * len(prompt.split())

    def generate(self, batch: Any, max_new_tokens: int) -> list[list[int]]:
        self.clock[0] += 0.100 + 0.010 * (max_new_tokens - 1)
        return [[0] * max_new_tokens for _ in batch]


def test_paired_rounds_compare_each_stream_with_the_bare_model_on_its_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    from tandem.bench import bare_generation

    clock = [0.0]
    monkeypatch.setattr("tandem.bench.bare_generation.time.perf_counter", lambda: clock[0])
    # Two streams a round (TTFT, ITL p50, seconds): the best TTFT of the two counts, as the bare prefill's best of two.
    served = iter(
        [(0.104, 0.0110), (0.109, 0.0200), (0.101, 0.0125), (0.098, 0.0300), (0.130, 0.0100), (0.150, 0.0100)]
    )
    paired = bare_generation.measure_paired(
        _ClockedLM(clock),  # type: ignore[arg-type]
        ["a b", "c d e"],
        max_new_tokens=11,
        served=lambda prompt: next(served),
        rounds=3,
    )
    rows = paired["rounds"]
    assert [r["prompt_tokens"] for r in rows] == [2, 3, 2]  # prompts in turn
    assert all(r["bare_prefill_ms"] == pytest.approx(100) and r["bare_per_token_ms"] == pytest.approx(10) for r in rows)
    assert paired["ttft_minus_bare_prefill_ms"] == pytest.approx(4.0)  # median of +4, -2, +30
    assert paired["first_ttft_minus_bare_prefill_ms"] == pytest.approx(4.0)  # median of the first: +4, +1, +30
    assert [r["ttft_first_ms"] for r in rows] == pytest.approx([104, 101, 130])
    assert paired["itl_minus_bare_per_token_ms"] == pytest.approx(1.0)  # the first stream's: +1, +2.5, 0


def test_paired_medians_are_the_c1_acceptance_figures() -> None:
    results = [{"concurrency": 1, "itl_p50_minus_bare_per_token_ms": 9.0, "ttft_p50_minus_bare_prefill_ms": 50.0}]
    paired = {"rounds": [{}] * 5, "itl_minus_bare_per_token_ms": 1.2, "ttft_minus_bare_prefill_ms": -3.0}
    acceptance = report.generate_acceptance(results, {}, paired)
    assert acceptance["c1_itl_over_bare_ms"]["value"] == 1.2 and acceptance["c1_itl_over_bare_ms"]["met"]
    assert acceptance["c1_ttft_over_bare_ms"]["value"] == -3.0
    assert "median of 5 paired rounds" in acceptance["c1_ttft_over_bare_ms"]["what"]
    unpaired = report.generate_acceptance(results, {})
    assert unpaired["c1_itl_over_bare_ms"]["value"] == 9.0 and not unpaired["c1_itl_over_bare_ms"]["met"]


def test_transformers_continuous_batching_is_a_figure_when_measured() -> None:
    level = Level(16, "m", 2)
    level.tokens, level.seconds = 100, 1.0
    assert math.isnan(compare_with_bare(level, _bare())["ratio_to_bare_continuous"])
    assert compare_with_bare(level, _bare(continuous_tokens_per_s=80.0))["ratio_to_bare_continuous"] == 1.25
    results = [_result(16, ratio_to_bare_batched=0.7, ratio_to_bare_single=5.0, ratio_to_bare_continuous=1.25)]
    acceptance = report.generate_acceptance(results, _bare())
    assert acceptance["c16_vs_bare_continuous"]["met"] and not acceptance["c16_vs_bare_batched"]["met"]
    runs = [_bare(continuous_tokens_per_s=70.0), _bare(continuous_tokens_per_s=80.0)]
    assert combine_bare_generation(runs)["continuous_tokens_per_s"] == 80.0
    assert "continuous_tokens_per_s" not in combine_bare_generation([_bare(), _bare()])
