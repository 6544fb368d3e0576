"""Request priority end to end, on real servers: metadata and the OIP parameter, API-key defaults and caps, the level
reaching the inference stage, and overload where low-priority callers take the refusals and high ones take none."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.__main__ import build_interceptors
from gateway.priority import PRIORITY_HEADER, PriorityInterceptor
from gateway.settings import GatewaySettings
from services.common import tensors
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.inference.v1 import inference_pb2
from tandem.oip.v2 import grpc_service_pb2 as oip
from tandem.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from tests.harness import Gateway, Stack, gateway_over
from tests.status import details_of

EMBED = gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["a short text"])


def oip_embed(priority: oip.InferParameter | None = None) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="tiny-embed")
    request.inputs.append(
        oip.ModelInferRequest.InferInputTensor(
            name="text", datatype="BYTES", shape=[1], contents=oip.InferTensorContents(bytes_contents=[b"a text"])
        )
    )
    if priority is not None:
        request.parameters["priority"].CopyFrom(priority)
    return request


def record_priorities(
    gateway: Gateway, texts: list[tuple[int, int]] | None = None, low_gate: asyncio.Event | None = None
) -> list[int]:
    """The priority of every InferRequest the gateway sends the inference stage, in the order it sends them (and in
    `texts`, each one's priority and number of texts). With `low_gate`, low-priority ones wait for it to open."""
    seen: list[int] = []
    client = gateway.pipeline.inference
    infer: Callable[..., Awaitable[Any]] = client.infer

    async def recording(request: inference_pb2.InferRequest, *args: Any, **kwargs: Any) -> Any:
        seen.append(request.priority)
        if texts is not None:
            texts.append((request.priority, len(tensors.decode(request.batch.cu_seqlens, "cu_seqlens")) - 1))
        if low_gate is not None and request.priority == inference_pb2.PRIORITY_LOW:
            await low_gate.wait()
        return await infer(request, *args, **kwargs)

    client.infer = recording  # type: ignore[method-assign]
    return seen


async def test_a_priority_that_is_not_a_level_is_invalid_argument_naming_where_it_was(stack: Stack) -> None:
    async with gateway_over(stack, interceptors=[PriorityInterceptor()]) as gateway:
        stub = gateway_pb2_grpc.GatewayServiceStub(gateway.channel)
        for value in ("urgent", "4", "-1"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Embed(EMBED, metadata=((PRIORITY_HEADER, value),))
            d = details_of(caught.value)
            assert (d.code, d.reason, d.fields) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_INPUT",
                [PRIORITY_HEADER],
            )
            assert d.message == f"x-tandem-priority must be one of high (1), normal (2), low (3), got {value!r}"
        infer = oip_grpc.GRPCInferenceServiceStub(gateway.channel)
        for parameter, shown in (
            (oip.InferParameter(int64_param=7), "7"),
            (oip.InferParameter(string_param="urgent"), "'urgent'"),
            (oip.InferParameter(bool_param=True), "True"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await infer.ModelInfer(oip_embed(parameter))
            d = details_of(caught.value)
            assert (d.code, d.reason, d.fields) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_INPUT",
                ["parameters[priority]"],
            )
            assert d.message.endswith(f"got {shown}")
    # The inference stage checks its own field: a level it does not know is refused by name.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.inference.Infer(inference_pb2.InferRequest(model="tiny-embed", priority=7))  # type: ignore[arg-type]
    d = details_of(caught.value)
    assert (d.code, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["priority"])
    assert d.message == "priority 7 is not a known level (1 high, 2 normal, 3 low)"


async def test_keys_set_the_default_and_cap_what_a_request_may_ask_for(stack: Stack) -> None:
    # Wired as the gateway wires it: authentication, then priority (then the rate limit, off here).
    settings = GatewaySettings(api_keys="vip max_priority=high; plain; batch priority=low", listen="127.0.0.1:0")
    async with gateway_over(stack, interceptors=build_interceptors(settings)) as gateway:
        seen = record_priorities(gateway)
        stub = gateway_pb2_grpc.GatewayServiceStub(gateway.channel)
        infer = oip_grpc.GRPCInferenceServiceStub(gateway.channel)
        cases: list[tuple[str, str | None, int]] = [
            ("vip", "high", inference_pb2.PRIORITY_HIGH),
            ("vip", None, inference_pb2.PRIORITY_NORMAL),
            ("vip", "3", inference_pb2.PRIORITY_LOW),
            ("plain", "high", inference_pb2.PRIORITY_NORMAL),  # above its cap: served at the cap, not refused
            ("plain", "low", inference_pb2.PRIORITY_LOW),
            ("batch", None, inference_pb2.PRIORITY_LOW),
            ("batch", "normal", inference_pb2.PRIORITY_LOW),
        ]
        for key, asked, level in cases:
            metadata = [("x-api-key", key)] + ([(PRIORITY_HEADER, asked)] if asked else [])
            for truncate in (True, False):  # coalesced, and run alone
                request = gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["a text"], truncate=truncate)
                reply = await stub.Embed(request, metadata=metadata)
                assert len(reply.embeddings) == 1
                assert seen.pop() == level, (key, asked, truncate)
        # The OIP `priority` parameter, as Triton's: 1 high .. 3 low, 0 the key's default; capped the same way.
        for key, parameter, level in [
            ("vip", oip.InferParameter(int64_param=1), inference_pb2.PRIORITY_HIGH),
            ("vip", oip.InferParameter(string_param="low"), inference_pb2.PRIORITY_LOW),
            ("plain", oip.InferParameter(uint64_param=1), inference_pb2.PRIORITY_NORMAL),
            ("batch", oip.InferParameter(int64_param=0), inference_pb2.PRIORITY_LOW),
        ]:
            await infer.ModelInfer(oip_embed(parameter), metadata=[("x-api-key", key)])
            assert seen.pop() == level, (key, parameter)
        assert seen == []


async def test_under_overload_low_priority_takes_the_refusals_and_still_gets_answers(stack: Stack) -> None:
    """256 low-priority callers overload a gateway that admits 32 texts per model, and their runs are held (a model
    busy with them); 4 high-priority callers beside them are never refused and are all served meanwhile; then every
    low-priority caller is answered. No timing is asserted: the latency figures are measured by
    scripts/priority_bench.py (docs/performance.md)."""
    async with gateway_over(
        stack, interceptors=[PriorityInterceptor()], coalesce_max_queued=32, coalesce_max_runs=2
    ) as gateway:
        texts: list[tuple[int, int]] = []
        low_runs = asyncio.Event()
        record_priorities(gateway, texts, low_runs)
        stub = gateway_pb2_grpc.GatewayServiceStub(gateway.channel)
        refusals = {"low": 0, "high": 0}
        finished: list[str] = []

        async def caller(level: str, requests: int) -> None:
            metadata = ((PRIORITY_HEADER, level),)
            for _ in range(requests):
                while True:
                    try:
                        await stub.Embed(EMBED, metadata=metadata, timeout=120)
                        break
                    except grpc.aio.AioRpcError as err:
                        d = details_of(err)
                        assert (d.code, d.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")
                        assert d.metadata == {"priority": level} and d.message.endswith(f"({level} priority)")
                        assert d.retry_delay_s is not None and d.retry_delay_s > 0
                        refusals[level] += 1
                        await asyncio.sleep(d.retry_delay_s)  # as the SDK does: RetryInfo says when
            finished.append(level)

        low = [asyncio.ensure_future(caller("low", 2)) for _ in range(256)]
        # The two run slots hold low runs and 24 low texts wait (3/4 of 32): the next low caller is refused.
        for _ in range(6000):
            if refusals["low"]:
                break
            await asyncio.sleep(0.01)
        high = [asyncio.ensure_future(caller("high", 8)) for _ in range(4)]
        # Served while every run slot is still held by low-priority work: a run of their own each time.
        await asyncio.wait_for(asyncio.gather(*high), 120)
        assert not low_runs.is_set() and finished == ["high"] * 4
        low_runs.set()
        await asyncio.gather(*low)

    assert refusals["low"] > 0 and refusals["high"] == 0
    assert finished.count("low") == 256
    # Every text reached the inference stage at its caller's level: runs merge callers of one level only.
    by_level = {level: sum(n for p, n in texts if p == level) for level in {p for p, _ in texts}}
    assert by_level == {inference_pb2.PRIORITY_HIGH: 4 * 8, inference_pb2.PRIORITY_LOW: 256 * 2}


async def test_the_priority_bench_runs_its_three_phases(stack: Stack, tmp_path: Path) -> None:
    """scripts/priority_bench.py end to end, briefly (its figures are for docs/performance.md, not for tests)."""
    out = tmp_path / "priority.json"
    async with gateway_over(stack, interceptors=[PriorityInterceptor()], coalesce_max_queued=8) as gateway:
        # A child process, so this event loop keeps serving the stages and the gateway meanwhile.
        bench = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).parents[2] / "scripts" / "priority_bench.py"),
            *("--target", gateway.server.address, "--model", "tiny-embed", "--high", "2", "--low", "16"),
            *("--unloaded-s", "0.5", "--loaded-s", "0.5", "--warmup-s", "0.2", "--crowd-nice", "5", "--out", str(out)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(bench.communicate(), 120)
    assert bench.returncode == 0, stderr.decode()
    result = json.loads(out.read_text())
    phases = result["phases"]
    assert list(phases) == ["unloaded", "priority", "no-priority"]
    for name in ("unloaded", "priority"):
        high = phases[name]["high"]
        assert high["refused"] == 0 and high["answered"] > 0 and high["callers_answered"] == 2
        assert high["other_errors"] == {} and "stage_p50_ms" in high  # empty here: this gateway sends no timings
    low = phases["priority"]["low"]
    assert low["callers_answered"] == 16 and low["refusals_of_unanswered_callers"] == []
    fewest, (p10, p50) = low["fewest_answers_of_a_caller"], low["answers_of_a_caller_p10_p50"]
    assert 0 < fewest <= p10 <= p50 <= low["answered"]
    assert result["high_p50_loaded_over_unloaded"] > 0
    assert result["callers"]["crowd_nice"] == 5
    assert phases["priority"]["low"]["client_cpu_cores"] > 0 and phases["priority"]["high"]["client_cpu_cores"] > 0
