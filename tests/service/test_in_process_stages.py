"""The light stages in the gateway's process (`--tokenizer in-process --postprocess in-process`): the gateway's
behaviour must not change with the shape, so the pipeline's and Generate's own tests run again here over a gateway
whose tokenizer and postprocess calls are answered by the stage cores in its process; then what only this shape
has (its trailers, its health, the local detokenizer stream ending with its caller).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from gateway.__main__ import build_pipeline, follow_stage_health
from gateway.local import LocalDuplex, LocalPostprocess, LocalTokenizer
from gateway.settings import GatewaySettings
from services.common import timing
from services.common.metrics import InferenceMetrics, MetricsInterceptor, ServiceMetrics
from tandem.gateway.v1 import gateway_pb2
from tandem.generation.v1 import generation_pb2
from tests.fixtures.tiny_causal import expected_continuation
from tests.harness import Stack, await_health, serve_stack

# The same tests, collected again in this module: they take `stack` and `gen`, which this module defines in-process.
from tests.service.test_gateway_pipeline import (  # noqa: F401
    test_classification_is_right,
    test_concurrent_callers_get_their_own_rows,
    test_deadline_exceeded,
    test_embeddings_match_reference,
    test_entities_are_right,
    test_errors,
    test_list_and_get_models,
    test_multi_label_uses_sigmoid,
    test_pooling_is_the_models_own,
    test_rerank_is_right,
)
from tests.service.test_generate import (  # noqa: F401
    test_a_prompt_past_the_context_is_input_too_long,
    test_a_stop_prefix_that_never_completes_is_released,
    test_bad_params_are_invalid_argument_naming_the_field,
    test_eight_prompts_at_once_each_equal_generate,
    test_greedy_output_equals_hugging_face_generate,
    test_messages_are_rendered_with_the_chat_template,
    test_messages_need_a_chat_template,
    test_stop_string_across_token_boundaries_cuts_the_text,
    test_stop_string_inside_a_token_and_the_earliest_of_several,
    test_text_deltas_never_split_a_character,
    test_timing_trailer_gives_first_token_and_tokens_per_second,
)

GPT2, LLAMA = "tiny-gpt2", "tiny-llama-chat"


def with_metrics(role: str) -> list[grpc.aio.ServerInterceptor]:
    return [MetricsInterceptor(ServiceMetrics(role, registry=CollectorRegistry()))]


@pytest.fixture(scope="module")
async def stack(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """As the session's stack (tests/conftest.py), with the light stages in the gateway's process."""
    home = tmp_path_factory.mktemp("home")
    async with serve_stack(
        served_repository,
        home,
        pipeline_options={"max_inputs": 100},
        interceptors=with_metrics,
        in_process=True,
        # As `tandem serve --in-process tokenizer,postprocess` runs it: the inference stage on a Unix socket, the
        # gateway's Infer calls multiplexed on one InferStream (gateway --inference-stream auto).
        inference_listen=f"unix:{home}/inference.sock",
        inference_stream=True,
    ) as running:
        assert isinstance(running.pipeline.tokenizer, LocalTokenizer)
        assert isinstance(running.pipeline.postprocess, LocalPostprocess)
        assert running.pipeline.inference.streamed
        yield running


# The inference stage's generation gauges (as in test_generate, a registry of this module's own).
METRICS = InferenceMetrics(CollectorRegistry())


@pytest.fixture(scope="module")
async def gen(causal_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """As test_generate's, with the light stages in the gateway's process."""
    async with serve_stack(
        causal_repository,
        tmp_path_factory.mktemp("home"),
        interceptors=with_metrics,
        inference_options={"observers": METRICS.recorder},
        in_process=True,
    ) as running:
        METRICS.watch(running.core)
        yield running


def running_sequences(model: str) -> float:
    for family in METRICS.registry.collect():
        for sample in family.samples:
            if sample.name == "tandem_generation_running_sequences" and sample.labels.get("model") == model:
                return sample.value
    raise AssertionError("no tandem_generation_running_sequences gauge")


async def test_the_trailer_times_the_local_stages_and_keeps_the_gateways_facts(stack: Stack) -> None:
    call = stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["good", "bad movie"]))
    reply = await call
    assert len(reply.embeddings) == 2
    timings = timing.parse_timings(str(dict(await call.trailing_metadata() or ())["x-tandem-timing"]))
    assert {"tokenize", "infer", "postprocess", "total"} <= set(timings)
    assert timings["tokenize"] + timings["infer"] + timings["postprocess"] <= timings["total"]


async def test_the_stages_own_notes_stay_out_of_the_callers_record(stack: Stack) -> None:
    """The tokenizer servicer notes the run's token count; the gateway's record keeps the gateway's own."""
    record = timing.begin()
    timing.note(tokens=1)
    request = stack.pipeline.tokenizer
    assert isinstance(request, LocalTokenizer)
    from tandem.tokenizer.v1 import tokenizer_pb2

    reply = await request.tokenize(tokenizer_pb2.TokenizeRequest(model="tiny-embed", texts=["a b c d e f"]), 0.0)
    assert reply.model == "tiny-embed"
    assert record.fields["tokens"] == 1 and "served_model" not in record.fields
    assert record.timings["tokenize"] > 0


async def test_health_follows_the_inference_stage_alone(stack: Stack) -> None:
    """With the light stages in its process, the gateway is SERVING while the inference stage is, whatever the
    (unused) tokenizer and postprocess servers do."""
    watcher = asyncio.create_task(follow_stage_health(stack.gateway, stack.pipeline, interval_s=0.05))
    try:
        await stack.stages["postprocess"].stop(0)
        await stack.stages["tokenizer"].stop(0)
        async with grpc.aio.insecure_channel(stack.gateway.address) as channel:
            await await_health(channel, health_pb2.HealthCheckResponse.SERVING, attempts=100)
        reply = await stack.stub.Embed(gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["good"]), timeout=20)
        assert len(reply.embeddings) == 1
    finally:
        watcher.cancel()


async def test_cancelling_a_generation_ends_the_local_detokenizer_and_others_go_on(gen: Stack) -> None:
    request = gateway_pb2.GenerateRequest(
        model=LLAMA, prompt="sun", params=generation_pb2.GenerationParams(max_new_tokens=200, ignore_eos=True)
    )
    call = gen.stub.Generate(request)
    assert isinstance(await call.read(), gateway_pb2.GenerateResponse)
    assert running_sequences(LLAMA) == 1
    call.cancel()
    replies = [
        r
        async for r in gen.stub.Generate(
            gateway_pb2.GenerateRequest(
                model=GPT2, prompt="sun", params=generation_pb2.GenerationParams(max_new_tokens=12)
            )
        )
    ]
    text = "".join(r.text for r in replies)
    assert text == expected_continuation("sun")[: len(text)] and text
    for _ in range(250):
        if running_sequences(LLAMA) == 0:
            break
        await asyncio.sleep(0.02)
    assert running_sequences(LLAMA) == 0


async def test_the_local_duplex_reads_eof_after_done_writing_and_after_cancel() -> None:
    async def echo(requests: AsyncIterator[int], context: object) -> AsyncIterator[int]:
        async for n in requests:
            yield n * 2

    stream: LocalDuplex[int, int] = LocalDuplex(echo)
    await stream.write(1)
    assert await stream.read() == 2
    await stream.write(2)
    assert await stream.read() == 4
    await stream.done_writing()
    assert await stream.read() is grpc.aio.EOF
    assert stream.done()

    cancelled: LocalDuplex[int, int] = LocalDuplex(echo)
    await cancelled.write(3)
    assert await cancelled.read() == 6
    assert cancelled.cancel() and not cancelled.cancel()
    assert await cancelled.read() is grpc.aio.EOF
    with pytest.raises(asyncio.InvalidStateError):
        await cancelled.write(4)


async def test_a_local_stage_error_is_raised_by_read() -> None:
    from services.common import errors

    async def failing(requests: AsyncIterator[int], context: object) -> AsyncIterator[int]:
        async for _ in requests:
            raise errors.invalid_argument("no", "stop")
            yield 0  # pragma: no cover

    stream: LocalDuplex[int, int] = LocalDuplex(failing)
    await stream.write(1)
    with pytest.raises(errors.TandemError) as caught:
        await stream.read()
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert stream.done() and await stream.read() is grpc.aio.EOF


async def test_gateway_settings_build_local_stages_for_in_process_targets(
    served_repository: Path, tmp_path: Path
) -> None:
    settings = GatewaySettings(
        tokenizer="in-process", postprocess="in-process", model_repository=served_repository, home=tmp_path
    )
    pipeline = build_pipeline(settings)
    separate = build_pipeline(GatewaySettings(tokenizer="127.0.0.1:1", postprocess="in-process", home=tmp_path))
    try:
        assert isinstance(pipeline.tokenizer, LocalTokenizer) and isinstance(pipeline.postprocess, LocalPostprocess)
        assert pipeline.tokenizer.core.repository.root == served_repository
        # Both local stages read one repository (one listing per model, not one each).
        assert pipeline.postprocess.core.repository is pipeline.tokenizer.core.repository
        assert not isinstance(separate.tokenizer, LocalTokenizer)
        assert isinstance(separate.postprocess, LocalPostprocess)
    finally:
        await pipeline.close()
        await separate.close()
