"""GatewayService.Generate end to end over the four in-process services and the tiny trained causal LMs: token
equality with Hugging Face generate(), sampling, stopping, text deltas, errors, cancellation and deadlines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from services.common.metrics import InferenceMetrics, MetricsInterceptor, ServiceMetrics
from tandem.gateway.v1 import gateway_pb2
from tandem.generation.v1 import generation_pb2
from tests.fixtures.tiny_causal import (
    CHAT_PROMPTS,
    CONTEXT,
    GPT2_PROMPTS,
    cycle_text,
    expected_continuation,
    reference_generate,
)
from tests.harness import Stack, serve_stack
from tests.status import details_of

GPT2, LLAMA = "tiny-gpt2", "tiny-llama-chat"
STOP, LENGTH, STOP_SEQUENCE = (
    generation_pb2.FINISH_REASON_STOP,
    generation_pb2.FINISH_REASON_LENGTH,
    generation_pb2.FINISH_REASON_STOP_SEQUENCE,
)


# The inference stage's metrics, as its __main__ wires them: the engine's observer and the scrape-time gauges.
METRICS = InferenceMetrics(CollectorRegistry())


@pytest.fixture(scope="module")
async def gen(causal_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """The four services over the causal repository, with the metrics interceptor (for the timing trailers)."""

    def interceptors(role: str) -> list[grpc.aio.ServerInterceptor]:
        return [MetricsInterceptor(ServiceMetrics(role, registry=CollectorRegistry()))]

    async with serve_stack(
        causal_repository,
        tmp_path_factory.mktemp("home"),
        interceptors=interceptors,
        inference_options={"observers": METRICS.recorder},
    ) as stack:
        METRICS.watch(stack.core)
        yield stack


def version_dir(stack: Stack, model: str) -> Path:
    return stack.repository / model / "1"


def prompt_ids(stack: Stack, model: str, prompt: str) -> list[int]:
    tokenizer: Any = AutoTokenizer.from_pretrained(str(version_dir(stack, model)))
    return list(tokenizer(prompt)["input_ids"])


async def generate(
    stack: Stack,
    model: str,
    prompt: str = "",
    *,
    messages: Sequence[tuple[str, str]] = (),
    deadline_s: float | None = 60.0,
    **params: Any,
) -> list[gateway_pb2.GenerateResponse]:
    request = gateway_pb2.GenerateRequest(
        model=model,
        prompt=prompt,
        messages=[generation_pb2.ChatMessage(role=r, content=c) for r, c in messages],
        params=generation_pb2.GenerationParams(**params),
    )
    return [response async for response in stack.stub.Generate(request, timeout=deadline_s)]


def ids_of(responses: Sequence[gateway_pb2.GenerateResponse]) -> list[int]:
    return [i for r in responses for i in r.token_ids]


def text_of(responses: Sequence[gateway_pb2.GenerateResponse]) -> str:
    return "".join(r.text for r in responses)


async def failure(stack: Stack, model: str, prompt: str = "", **kwargs: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stack, model, prompt, **kwargs)
    return caught.value


# ----------------------------------------------------------------------------------------------------------------------
# Same tokens as Hugging Face generate()


@pytest.mark.parametrize("model", [GPT2, LLAMA])
async def test_greedy_output_equals_hugging_face_generate(gen: Stack, model: str) -> None:
    prompt = GPT2_PROMPTS[3]
    responses = await generate(gen, model, prompt, max_new_tokens=24)
    reference, _ = reference_generate(version_dir(gen, model), prompt_ids(gen, model, prompt), max_new_tokens=24)
    assert ids_of(responses) == reference
    assert text_of(responses) == expected_continuation(prompt)
    last = responses[-1]
    assert last.finish_reason == STOP
    assert (last.usage.prompt_tokens, last.usage.generated_tokens) == (
        len(prompt_ids(gen, model, prompt)),
        len(reference),
    )
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.generated_tokens
    assert (last.model, last.model_version) == (model, "1")
    assert all(r.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])


async def test_eight_prompts_at_once_each_equal_generate(gen: Stack) -> None:
    prompts = GPT2_PROMPTS[:8]
    results = await asyncio.gather(*(generate(gen, GPT2, p, max_new_tokens=20, ignore_eos=True) for p in prompts))
    for prompt, responses in zip(prompts, results, strict=True):
        reference, _ = reference_generate(
            version_dir(gen, GPT2), prompt_ids(gen, GPT2, prompt), max_new_tokens=20, ignore_eos=True
        )
        assert ids_of(responses) == reference, prompt


async def test_long_prompts_joining_while_others_decode_equal_generate(gen: Stack) -> None:
    # 8 prompts of ~150 tokens arrive at once: more than the 512 prompt tokens prefilled between two steps, so some
    # join while others already decode, and the batch is padded to rows of different lengths.
    prompts = [cycle_text(start, 50) for start in range(8)]
    results = await asyncio.gather(*(generate(gen, GPT2, p, max_new_tokens=12, ignore_eos=True) for p in prompts))
    assert sum(len(prompt_ids(gen, GPT2, p)) for p in prompts) > 512
    for prompt, responses in zip(prompts, results, strict=True):
        reference, _ = reference_generate(
            version_dir(gen, GPT2), prompt_ids(gen, GPT2, prompt), max_new_tokens=12, ignore_eos=True
        )
        assert ids_of(responses) == reference, prompt


async def test_text_deltas_never_split_a_character(gen: Stack) -> None:
    for prompt in GPT2_PROMPTS:
        responses = await generate(gen, GPT2, prompt, max_new_tokens=30, ignore_eos=True)
        assert all("\ufffd" not in r.text for r in responses), prompt
        # Emoji and CJK items are several byte tokens each: some message carries ids but no text yet.
        assert any(r.token_ids and not r.text for r in responses) or len(responses) < 3


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


async def test_a_seed_gives_the_same_text_alone_and_among_other_requests(gen: Stack) -> None:
    params: dict[str, Any] = {
        "temperature": 1.5,
        "top_k": 40,
        "top_p": 0.95,
        "seed": 1234,
        "max_new_tokens": 24,
        "ignore_eos": True,
    }
    alone = text_of(await generate(gen, GPT2, "sun", **params))
    again = text_of(await generate(gen, GPT2, "sun", **params))
    others = [generate(gen, GPT2, p, temperature=2.0, max_new_tokens=24) for p in GPT2_PROMPTS[:7]]
    amid, *_ = await asyncio.gather(generate(gen, GPT2, "sun", **params), *others)
    assert alone == again == text_of(amid)
    # Hot sampling with other seeds reaches other texts (the greedy answer is far more likely than any one of them).
    texts = {
        text_of(await generate(gen, GPT2, "sun", temperature=5.0, seed=s, max_new_tokens=16, ignore_eos=True))
        for s in range(4)
    }
    assert len(texts) > 1


async def test_repetition_penalty_equals_generate(gen: Stack) -> None:
    prompt = "sun 🍎 moon"
    responses = await generate(gen, GPT2, prompt, max_new_tokens=20, repetition_penalty=1.3, ignore_eos=True)
    reference, _ = reference_generate(
        version_dir(gen, GPT2),
        prompt_ids(gen, GPT2, prompt),
        max_new_tokens=20,
        repetition_penalty=1.3,
        ignore_eos=True,
    )
    assert ids_of(responses) == reference


async def test_logprobs_equal_the_reference_log_softmax(gen: Stack) -> None:
    prompt = "moon 猫"
    responses = await generate(gen, GPT2, prompt, max_new_tokens=8, logprobs=3)
    reference, rows = reference_generate(
        version_dir(gen, GPT2), prompt_ids(gen, GPT2, prompt), max_new_tokens=8, output_logprobs=True
    )
    steps = [lp for r in responses for lp in r.logprobs]
    assert rows is not None and len(steps) == len(reference) == len(rows)
    for step, token, row in zip(steps, reference, rows, strict=True):
        assert step.token_id == token
        assert step.logprob == pytest.approx(row[token], abs=1e-4)
        best = sorted(range(len(row)), key=lambda i: -row[i])[:3]
        assert [t.token_id for t in step.top] == best
        assert [t.logprob for t in step.top] == pytest.approx([row[i] for i in best], abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Stopping


async def test_stop_string_across_token_boundaries_cuts_the_text(gen: Stack) -> None:
    # " 🍎 moon 猫 star ...": "moon 猫" spans the word token and the three byte tokens of 猫.
    responses = await generate(gen, GPT2, "sun", stop=["moon 猫"], max_new_tokens=30)
    assert text_of(responses) == " 🍎 "
    last = responses[-1]
    assert (last.finish_reason, last.stop_sequence) == (STOP_SEQUENCE, "moon 猫")
    reference, _ = reference_generate(version_dir(gen, GPT2), prompt_ids(gen, GPT2, "sun"), max_new_tokens=30)
    tokenizer: Any = AutoTokenizer.from_pretrained(str(version_dir(gen, GPT2)))
    needed = next(k for k in range(1, len(reference) + 1) if "moon 猫" in tokenizer.decode(reference[:k]))
    assert last.usage.generated_tokens == needed
    assert ids_of(responses) == reference[:needed]


async def test_stop_string_inside_a_token_and_the_earliest_of_several(gen: Stack) -> None:
    responses = await generate(gen, GPT2, "sun", stop=["star", "oo"], max_new_tokens=30)
    assert text_of(responses) == " 🍎 m"
    assert responses[-1].stop_sequence == "oo"


async def test_a_stop_prefix_that_never_completes_is_released(gen: Stack) -> None:
    responses = await generate(gen, GPT2, "star", stop=["rain 🌊 sun"], max_new_tokens=30)
    assert text_of(responses) == expected_continuation("star")
    assert responses[-1].finish_reason == STOP


async def test_max_new_tokens_ends_with_length(gen: Stack) -> None:
    responses = await generate(gen, GPT2, "sun", max_new_tokens=3)
    assert len(ids_of(responses)) == 3
    assert responses[-1].finish_reason == LENGTH
    assert responses[-1].usage.generated_tokens == 3


async def test_min_new_tokens_suppresses_eos_as_generate_does(gen: Stack) -> None:
    prompt = "rain 🌊"  # EOS is the first new token without min_new_tokens
    assert ids_of(await generate(gen, GPT2, prompt, max_new_tokens=10))[-1:] == ids_of(
        await generate(gen, GPT2, prompt, max_new_tokens=1)
    )
    responses = await generate(gen, GPT2, prompt, max_new_tokens=12, min_new_tokens=6)
    reference, _ = reference_generate(
        version_dir(gen, GPT2), prompt_ids(gen, GPT2, prompt), max_new_tokens=12, min_new_tokens=6
    )
    assert ids_of(responses) == reference
    assert len(reference) >= 6


async def test_ignore_eos_runs_to_max_new_tokens(gen: Stack) -> None:
    responses = await generate(gen, GPT2, "rain", max_new_tokens=16, ignore_eos=True)
    reference, _ = reference_generate(
        version_dir(gen, GPT2), prompt_ids(gen, GPT2, "rain"), max_new_tokens=16, ignore_eos=True
    )
    assert ids_of(responses) == reference and len(reference) == 16
    assert responses[-1].finish_reason == LENGTH


async def test_stop_token_ids_end_with_stop_sequence(gen: Stack) -> None:
    reference, _ = reference_generate(version_dir(gen, GPT2), prompt_ids(gen, GPT2, "sun"), max_new_tokens=10)
    token = reference[4]
    responses = await generate(gen, GPT2, "sun", stop_token_ids=[token], max_new_tokens=10)
    assert ids_of(responses) == reference[: reference.index(token) + 1]
    assert (responses[-1].finish_reason, responses[-1].stop_token_id) == (STOP_SEQUENCE, token)


# ----------------------------------------------------------------------------------------------------------------------
# Chat


@pytest.mark.parametrize("prompt", CHAT_PROMPTS[:3])
async def test_messages_are_rendered_with_the_chat_template(gen: Stack, prompt: str) -> None:
    responses = await generate(gen, LLAMA, messages=[("system", "Be brief."), ("user", prompt)], max_new_tokens=40)
    assert text_of(responses) == expected_continuation(prompt, chat=True)
    assert responses[-1].finish_reason == STOP


async def test_get_model_describes_generation_models(gen: Stack) -> None:
    models = {m.name: m for m in (await gen.stub.ListModels(gateway_pb2.ListModelsRequest())).models}
    for name, template in ((GPT2, False), (LLAMA, True)):
        info = models[name]
        assert info.task == 5  # TASK_TEXT_GENERATION
        assert (info.context_length, info.max_input_length, info.chat_template) == (CONTEXT, CONTEXT - 1, template)
        assert info.ready and info.backend == "torch"


async def test_timing_trailer_gives_first_token_and_tokens_per_second(gen: Stack) -> None:
    call = gen.stub.Generate(
        gateway_pb2.GenerateRequest(
            model=GPT2, prompt="sun", params=generation_pb2.GenerationParams(max_new_tokens=12, ignore_eos=True)
        )
    )
    _ = [r async for r in call]
    trailers = dict(await call.trailing_metadata() or ())
    assert "first_token=" in str(trailers["x-tandem-timing"])
    generation = str(trailers["x-tandem-generation"])
    assert generation.startswith("tokens=12, tokens_per_s=")
    assert float(generation.split("tokens_per_s=")[1]) > 0


# ----------------------------------------------------------------------------------------------------------------------
# Errors: code, reason and field


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"temperature": -0.5}, "params.temperature"),
        ({"top_p": 0.0}, "params.top_p"),
        ({"top_p": 1.5}, "params.top_p"),
        ({"max_new_tokens": 0}, "params.max_new_tokens"),
        ({"max_new_tokens": CONTEXT}, "params.max_new_tokens"),
        ({"min_new_tokens": 5, "max_new_tokens": 2}, "params.min_new_tokens"),
        ({"top_k": -1}, "params.top_k"),
        ({"repetition_penalty": 0.0}, "params.repetition_penalty"),
        ({"logprobs": 21}, "params.logprobs"),
        ({"stop": [str(i) for i in range(17)]}, "stop"),
        ({"stop": [""]}, "stop[0]"),
    ],
)
async def test_bad_params_are_invalid_argument_naming_the_field(gen: Stack, params: dict[str, Any], field: str) -> None:
    err = await failure(gen, GPT2, "sun", **params)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = details_of(err)
    assert info.field_violations[0].field == field, err.details()


async def test_a_prompt_past_the_context_is_input_too_long(gen: Stack) -> None:
    err = await failure(gen, GPT2, " ".join(["sun"] * CONTEXT))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = details_of(err)
    assert (info.reason, info.field_violations[0].field) == ("INPUT_TOO_LONG", "prompt")
    assert f"at most {CONTEXT - 1}" in (err.details() or "")


async def test_messages_need_a_chat_template(gen: Stack) -> None:
    err = await failure(gen, GPT2, messages=[("user", "sun")])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = details_of(err)
    assert (info.reason, info.field_violations[0].field) == ("NO_CHAT_TEMPLATE", "messages")
    assert "no chat template" in (err.details() or "")


async def test_a_role_the_template_refuses_is_invalid_argument(gen: Stack) -> None:
    err = await failure(gen, LLAMA, messages=[("robot", "sun")])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "roles must be system, user or assistant" in (err.details() or "")


async def test_prompt_and_messages_together_or_neither_are_refused(gen: Stack) -> None:
    cases: list[dict[str, Any]] = [{"prompt": "sun", "messages": [("user", "sun")]}, {}]
    for kwargs in cases:
        err = await failure(gen, LLAMA, **kwargs)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details_of(err).field_violations[0].field == "prompt"


async def test_an_encoder_model_cannot_generate_and_a_generator_cannot_embed(gen: Stack) -> None:
    err = await failure(gen, "tiny-sentiment", "sun")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(err).reason == "WRONG_TASK"
    assert "Generate needs a text-generation model" in (err.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gen.stub.Embed(gateway_pb2.EmbedRequest(model=GPT2, inputs=["sun"]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(caught.value).reason == "WRONG_TASK"
    assert "text-generation model" in (caught.value.details() or "")


# ----------------------------------------------------------------------------------------------------------------------
# Cancellation and deadlines


def engine_gauges(stack: Stack, model: str) -> dict[str, float]:
    """The generation metrics of the inference stage's /metrics, as a scrape reads them."""
    out: dict[str, float] = {}
    for family in METRICS.registry.collect():
        for sample in family.samples:
            if sample.name.startswith("tandem_generation_") and sample.labels.get("model") == model:
                out[sample.name.removeprefix("tandem_generation_")] = sample.value
    return out


async def settled(stack: Stack, model: str) -> dict[str, float]:
    """The gauges once no sequence runs or holds cache (waits up to 5 s)."""
    for _ in range(250):
        gauges = engine_gauges(stack, model)
        if gauges["running_sequences"] == gauges["kv_cache_reserved_tokens"] == gauges["kv_cache_used_tokens"] == 0:
            return gauges
        await asyncio.sleep(0.02)
    return engine_gauges(stack, model)


async def test_cancelling_mid_stream_frees_the_cache_and_others_go_on(gen: Stack) -> None:
    request = gateway_pb2.GenerateRequest(
        model=LLAMA, prompt="sun", params=generation_pb2.GenerationParams(max_new_tokens=200, ignore_eos=True)
    )
    call = gen.stub.Generate(request)
    first = await call.read()
    assert isinstance(first, gateway_pb2.GenerateResponse)
    busy = engine_gauges(gen, LLAMA)
    assert busy["kv_cache_reserved_tokens"] > 0 and busy["kv_cache_capacity_tokens"] > 0
    other = asyncio.ensure_future(generate(gen, GPT2, "sun", max_new_tokens=12))
    call.cancel()
    gauges = await settled(gen, LLAMA)
    assert gauges["running_sequences"] == gauges["kv_cache_reserved_tokens"] == gauges["kv_cache_used_tokens"] == 0
    assert text_of(await other) == expected_continuation("sun")[: len(text_of(await other))]
    # The sequence was dropped, not run to its end: 200 tokens of this model take far longer than the wait above.
    assert engine_gauges(gen, LLAMA)["tokens_total"] < 200 + busy["tokens_total"]


async def test_a_deadline_mid_stream_is_deadline_exceeded_and_frees_the_cache(gen: Stack) -> None:
    started = time.monotonic()
    received: list[gateway_pb2.GenerateResponse] = []
    request = gateway_pb2.GenerateRequest(
        model=LLAMA,
        prompt="sun",
        params=generation_pb2.GenerationParams(max_new_tokens=CONTEXT - 8, ignore_eos=True),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in gen.stub.Generate(request, timeout=0.25):
            received.append(response)
            await asyncio.sleep(0.01)  # a slow reader: the deadline passes while tokens are still coming
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    gauges = await settled(gen, LLAMA)
    assert gauges["running_sequences"] == gauges["kv_cache_reserved_tokens"] == 0
    # The stage still serves.
    assert text_of(await generate(gen, GPT2, "sun", max_new_tokens=40)) == expected_continuation("sun")


async def test_a_full_cache_is_resource_exhausted_with_retry_info(gen: Stack) -> None:
    capacity = int(engine_gauges(gen, GPT2)["kv_cache_capacity_tokens"])
    room = CONTEXT - 2
    calls = []
    try:
        # Sequences that each reserve most of the context, until the cache cannot take another.
        for _ in range(capacity // room + 1):
            call = gen.stub.Generate(
                gateway_pb2.GenerateRequest(
                    model=GPT2,
                    prompt="sun",
                    params=generation_pb2.GenerationParams(max_new_tokens=room - 1, ignore_eos=True),
                )
            )
            calls.append(call)
        outcomes = await asyncio.gather(*(call.read() for call in calls), return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert refused, "every sequence fit in the cache"
        err = refused[0]
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = details_of(err)
        assert info.reason == "QUEUE_FULL" and info.retry_delay_s is not None and info.retry_delay_s > 0
        assert "KV cache" in (err.details() or "")
    finally:
        for call in calls:
            call.cancel()
    await settled(gen, GPT2)
