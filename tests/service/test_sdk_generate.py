"""tandem.sdk generate/generate_text: deltas against a real in-process stack serving a tiny causal LM (both clients),
cancellation when the caller stops reading, the server's errors, and retries only before the first message."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from services.common import errors
from services.inference.generation.engine import GeneratedTokens
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.generation.v1 import generation_pb2
from tandem.sdk import AsyncTandemClient, GenerationDelta, TandemClient, TandemError
from tests.fixtures.tiny_causal import expected_continuation, make_llama_chat
from tests.harness import Stack, serve_stack

MODEL = "tiny-llama-chat"  # continues a cycle of words (tests/fixtures/tiny_causal.py); has a chat template
PROMPT = "sun 🍎 moon"


@pytest.fixture(scope="module")
def generation_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("generation-repository")
    make_llama_chat(root, MODEL)
    return root


@pytest.fixture(scope="module")
async def generation_stack(
    generation_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    async with serve_stack(generation_repository, tmp_path_factory.mktemp("home")) as running:
        await running.core.load(MODEL, wait=True)
        yield running


@pytest.fixture
async def client(generation_stack: Stack) -> AsyncIterator[AsyncTandemClient]:
    async with AsyncTandemClient(generation_stack.gateway.address) as client:
        yield client


def check_deltas(deltas: list[GenerationDelta], max_new_tokens: int) -> None:
    """Only the last delta says why and how much; every delta's logprobs match its token ids."""
    *body, last = deltas
    assert all(d.finish_reason is None and d.usage is None and d.model_version == "" for d in body)
    assert last.finish_reason == "length" and last.stop_sequence is None and last.stop_token_id is None
    assert last.usage is not None and last.usage.generated_tokens == max_new_tokens
    assert last.usage.prompt_tokens > 0 and last.usage.total_tokens == last.usage.prompt_tokens + max_new_tokens
    assert (last.model, last.model_version) == (MODEL, "1")
    assert sum(len(d.token_ids) for d in deltas) == max_new_tokens
    for delta in deltas:
        assert [p.token_id for p in delta.logprobs] == delta.token_ids
        for p in delta.logprobs:
            assert len(p.top) == 2 and p.top[0][1] >= p.top[1][1]
            assert p.top[0][0] == p.token_id  # greedy: the chosen token is the most likely one


async def test_async_deltas_join_to_generate_text(client: AsyncTandemClient) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "max_new_tokens": 12, "ignore_eos": True, "logprobs": 2}
    deltas = [d async for d in client.generate(PROMPT, **kwargs)]
    check_deltas(deltas, 12)
    result = await client.generate_text(PROMPT, **kwargs)
    assert result.text == "".join(d.text for d in deltas) and result.text
    assert result.token_ids == [i for d in deltas for i in d.token_ids]
    assert result.logprobs == [p for d in deltas for p in d.logprobs]
    assert (result.finish_reason, result.usage, result.model_version) == ("length", deltas[-1].usage, "1")


async def test_sync_deltas_join_to_generate_text(client: AsyncTandemClient, generation_stack: Stack) -> None:
    expected = await client.generate_text(PROMPT, model=MODEL, max_new_tokens=10, ignore_eos=True)

    def use() -> None:
        with TandemClient(generation_stack.gateway.address) as sync_client:
            deltas = list(sync_client.generate(PROMPT, model=MODEL, max_new_tokens=10, ignore_eos=True, logprobs=2))
            check_deltas(deltas, 10)
            assert "".join(d.text for d in deltas) == expected.text
            result = sync_client.generate_text(PROMPT, model=MODEL, max_new_tokens=10, ignore_eos=True)
            assert (result.text, result.token_ids, result.finish_reason) == (
                expected.text,
                expected.token_ids,
                "length",
            )

    # The stack's servers share this event loop, so the blocking client runs in a thread.
    await asyncio.to_thread(use)


async def test_why_it_ended(client: AsyncTandemClient) -> None:
    full = await client.generate_text(PROMPT, model=MODEL)
    assert (full.text, full.finish_reason) == (expected_continuation(PROMPT), "stop")
    assert (full.stop_sequence, full.stop_token_id, full.usage.generated_tokens) == (None, None, len(full.token_ids))

    cut = await client.generate_text(PROMPT, model=MODEL, stop=["東京", "star"])
    assert (cut.text, cut.finish_reason, cut.stop_sequence, cut.stop_token_id) == (
        " 猫 ",
        "stop_sequence",
        "star",
        None,
    )

    stop_id = full.token_ids[2]
    by_id = await client.generate_text(PROMPT, model=MODEL, stop_token_ids=[stop_id])
    assert (by_id.finish_reason, by_id.stop_sequence, by_id.stop_token_id) == ("stop_sequence", None, stop_id)
    assert by_id.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]
    # The stop id may end mid-character ("猫" is three byte tokens): the last delta flushes it as U+FFFD.
    assert full.text.startswith(by_id.text.rstrip("\ufffd"))

    chat = await client.generate_text(model=MODEL, messages=[{"role": "user", "content": PROMPT}])
    assert (chat.text, chat.finish_reason) == (expected_continuation(PROMPT, chat=True), "stop")


@pytest.fixture
def engine_runs(generation_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """For each generation the engine runs during the test, once it ends: whether it reached its last token (False:
    it was cancelled)."""
    engine = generation_stack.core.loaded(MODEL).engine
    assert engine is not None
    original = engine.generate
    runs: list[bool] = []

    async def generate(*args: Any, **kwargs: Any) -> AsyncGenerator[GeneratedTokens, None]:
        finished = False
        try:
            async with contextlib.aclosing(original(*args, **kwargs)) as chunks:
                async for chunk in chunks:
                    finished = chunk.finish is not None
                    yield chunk
        finally:
            runs.append(finished)

    monkeypatch.setattr(engine, "generate", generate)
    return runs


async def stopped(stack: Stack, timeout_s: float = 10.0) -> None:
    """Waits until the inference stage holds no generation of MODEL."""
    slot = stack.core.loaded(MODEL)
    deadline = time.monotonic() + timeout_s
    while slot.in_flight:
        assert time.monotonic() < deadline, f"{slot.in_flight} generation(s) still running after the caller left"
        await asyncio.sleep(0.02)


# Long enough (a second or so) that it cannot end by itself before the cancellation reaches the engine.
LONG: dict[str, Any] = {"model": MODEL, "max_new_tokens": 200, "ignore_eos": True}


async def test_async_breaking_out_cancels_the_call(
    client: AsyncTandemClient, generation_stack: Stack, engine_runs: list[bool]
) -> None:
    async with contextlib.aclosing(client.generate(PROMPT, **LONG)) as deltas:
        async for delta in deltas:
            assert delta.finish_reason is None
            break
    await stopped(generation_stack)
    # Left without closing: the generator is closed (and its call cancelled) when it is collected.
    async for _ in client.generate(PROMPT, **LONG):
        break
    await stopped(generation_stack)
    result = await client.generate_text(PROMPT, model=MODEL, max_new_tokens=3, ignore_eos=True)
    assert result.usage.generated_tokens == 3
    assert engine_runs == [False, False, True]


async def test_sync_breaking_out_cancels_the_call(generation_stack: Stack, engine_runs: list[bool]) -> None:
    def use() -> None:
        with TandemClient(generation_stack.gateway.address) as sync_client:
            deltas = sync_client.generate(PROMPT, **LONG)
            for delta in deltas:
                assert delta.finish_reason is None
                break
            deltas.close()
            for _ in sync_client.generate(PROMPT, **LONG):
                break  # the iterator is collected, and so closed, right here
            result = sync_client.generate_text(PROMPT, model=MODEL, max_new_tokens=3, ignore_eos=True)
            assert result.usage.generated_tokens == 3

    await asyncio.to_thread(use)
    await stopped(generation_stack)
    assert engine_runs == [False, False, True]


async def test_sync_cancel_from_another_thread_ends_the_stream_quietly(
    generation_stack: Stack, engine_runs: list[bool]
) -> None:
    """GenerationStream.cancel() while the iterating thread waits inside gRPC (what tandem chat's SIGINT handler does):
    the iteration ends without an error, the server drops the sequence, and the client's channel serves the next call.
    Before the first next() it makes no call at all; after the stream ended it changes nothing."""

    def use() -> None:
        with TandemClient(generation_stack.gateway.address) as sync_client:
            stream = sync_client.generate(PROMPT, **LONG)
            first = next(stream)
            assert first.finish_reason is None
            threading.Timer(0.05, stream.cancel).start()
            rest = list(stream)  # ends when cancelled, without raising
            assert stream.cancelled and all(d.finish_reason is None for d in rest)
            assert not stream.cancel()  # it has ended

            early = sync_client.generate(PROMPT, **LONG)
            assert early.cancel() and early.cancelled
            assert list(early) == []

            whole = sync_client.generate(PROMPT, model=MODEL, max_new_tokens=3, ignore_eos=True)
            deltas = list(whole)
            assert deltas[-1].finish_reason == "length"
            assert not whole.cancel() and not whole.cancelled

    await asyncio.to_thread(use)
    await stopped(generation_stack)
    assert engine_runs == [False, True]  # the cancelled one cut short; none for the stream cancelled before a call


async def test_errors_carry_code_and_field(client: AsyncTandemClient, generation_stack: Stack) -> None:
    with pytest.raises(TandemError) as caught:
        async for _ in client.generate(PROMPT, model=MODEL, temperature=-1):
            pass
    assert (caught.value.code, caught.value.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["params.temperature"])
    with pytest.raises(TandemError) as caught:
        await client.generate_text(PROMPT, model=MODEL, messages=[{"role": "user", "content": "sun"}])
    assert (caught.value.code, caught.value.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["prompt"])
    with pytest.raises(TypeError, match="stop must be a sequence"):
        client.generate(PROMPT, stop="\n")

    def use() -> None:
        with TandemClient(generation_stack.gateway.address) as sync_client, pytest.raises(TandemError) as caught:
            sync_client.generate_text(PROMPT, model=MODEL, temperature=-1)
        assert (caught.value.code, caught.value.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["params.temperature"])

    await asyncio.to_thread(use)


# Retries, against a gateway whose Generate fails on purpose before or after its first message.


class FlakyGenerator(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self) -> None:
        self.attempts = 0
        self.fail_before = 0  # attempts that fail before sending anything
        self.fail_after_first = False  # then fail after the first message

    def Generate(  # noqa: N802
        self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[gateway_pb2.GenerateResponse]:
        self.attempts += 1
        unavailable = rpc_status.to_status(errors.unavailable("model loading", retry_after_s=0.05).to_status_proto())
        if self.attempts <= self.fail_before:
            context.abort_with_status(unavailable)
        yield gateway_pb2.GenerateResponse(text="Hello", token_ids=[1], model="fake")
        if self.fail_after_first:
            context.abort_with_status(unavailable)
        yield gateway_pb2.GenerateResponse(
            text=" world",
            token_ids=[2],
            model="fake",
            model_version="7",
            finish_reason=generation_pb2.FINISH_REASON_STOP,
            usage=gateway_pb2.Usage(prompt_tokens=3, generated_tokens=2, total_tokens=5),
        )


@pytest.fixture
def flaky() -> Iterator[tuple[FlakyGenerator, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = FlakyGenerator()
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


async def test_retried_only_before_the_first_message(flaky: tuple[FlakyGenerator, str]) -> None:
    servicer, address = flaky
    servicer.fail_before = 2
    with TandemClient(address) as sync_client:
        result = sync_client.generate_text("hi")
    assert (result.text, result.token_ids, result.finish_reason, result.model_version) == (
        "Hello world",
        [1, 2],
        "stop",
        "7",
    )
    assert (result.usage.prompt_tokens, result.usage.generated_tokens, servicer.attempts) == (3, 2, 3)

    servicer.attempts, servicer.fail_before = 0, 1
    async with AsyncTandemClient(address) as async_client:
        assert (await async_client.generate_text("hi")).text == "Hello world"
        assert servicer.attempts == 2

        servicer.attempts, servicer.fail_before, servicer.fail_after_first = 0, 0, True
        received: list[str] = []
        with pytest.raises(TandemError) as caught:
            async for delta in async_client.generate("hi"):
                received.append(delta.text)
    assert (received, caught.value.code, servicer.attempts) == (["Hello"], grpc.StatusCode.UNAVAILABLE, 1)

    servicer.attempts = 0
    with TandemClient(address) as sync_client, pytest.raises(TandemError):
        list(sync_client.generate("hi"))
    assert servicer.attempts == 1
