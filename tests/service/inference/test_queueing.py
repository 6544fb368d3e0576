"""The inference stage over a real gRPC channel, under load and abuse: concurrent callers get exactly their own rows,
a full queue answers RESOURCE_EXHAUSTED with RetryInfo, expired and cancelled calls never reach the model, every
error carries its code and details, and a new version takes over once loaded."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.common import errors, tensors
from services.common.errors import Reason
from services.common.repository import ModelRepository
from services.inference.core import Inference
from tandem.inference.v1 import inference_pb2
from tandem.tensor.v1 import tensor_pb2
from tests.service.inference.support import ATOL, Served, copy_model, infer, status_details, token_batch, until


@pytest.mark.parametrize("model", ["tiny-embed", "tiny-sentiment"])
async def test_concurrent_callers_get_exactly_their_own_rows(served: Served, model: str) -> None:
    rng = np.random.default_rng(3)
    vocab = 100
    requests = [
        [
            {"input_ids": rng.integers(5, vocab, size=int(rng.integers(2, 40))).tolist()}
            for _ in range(int(rng.integers(1, 5)))
        ]
        for _ in range(60)
    ]
    for seqs in requests:
        for s in seqs:
            s["token_type_ids"] = [0] * len(s["input_ids"])
    alone = [await infer(served, model, seqs) for seqs in requests]

    probe = served.probes.by_model[model]
    batcher = served.core.loaded(model).batcher
    assert batcher is not None
    probe.gate.clear()
    probe.started.clear()
    calls_before = probe.calls
    try:
        first = asyncio.ensure_future(infer(served, model, requests[0]))
        await until(probe.started.is_set, "the first model call")
        rest = [asyncio.ensure_future(infer(served, model, seqs)) for seqs in requests[1:]]
        await until(lambda: batcher.pending == sum(len(r) for r in requests), "every caller queued")
    finally:
        probe.gate.set()
    together = await asyncio.gather(first, *rest)
    for mine, reference_rows in zip(together, alone, strict=True):
        assert mine.shape == reference_rows.shape
        np.testing.assert_allclose(mine, reference_rows, atol=ATOL)
    # 59 callers waited behind the first call; they shared a few calls instead of one each.
    assert probe.calls - calls_before < len(requests) // 2


async def test_a_full_queue_answers_resource_exhausted_with_retry_info(served: Served) -> None:
    probe = served.probes.by_model["tiny-small-queue"]
    probe.gate.clear()
    probe.started.clear()
    try:
        first = asyncio.ensure_future(
            infer(served, "tiny-small-queue", [{"input_ids": [2, 10, 3], "token_type_ids": [0, 0, 0]}] * 2)
        )
        await until(probe.started.is_set, "the first model call")
        second = asyncio.ensure_future(
            infer(served, "tiny-small-queue", [{"input_ids": [2, 11, 3], "token_type_ids": [0, 0, 0]}] * 2)
        )
        batcher = served.core.loaded("tiny-small-queue").batcher
        assert batcher is not None
        await until(lambda: batcher.pending == 4, "the queue to fill")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer(served, "tiny-small-queue", [{"input_ids": [2, 12, 3], "token_type_ids": [0, 0, 0]}])
    finally:
        probe.gate.set()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = status_details(caught.value)
    assert details["ErrorInfo"].reason == Reason.QUEUE_FULL
    assert details["RetryInfo"].retry_delay.ToNanoseconds() > 0
    await asyncio.gather(first, second)
    assert [2, 12, 3] not in probe.seen


async def test_an_expired_call_never_reaches_the_model(served: Served) -> None:
    probe = served.probes.by_model["tiny-small-queue"]
    marker = [2, 99, 98, 97, 3]
    # A deadline already gone when the core sees the call: refused before queuing.
    ids = np.array(marker, dtype=np.int64)
    with pytest.raises(errors.TandemError) as caught:
        await served.core.infer("tiny-small-queue", ids, None, np.array([0, 5], np.int32), time.monotonic() - 1)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    # A client deadline that passes while the call waits behind a running one.
    probe.gate.clear()
    probe.started.clear()
    try:
        first = asyncio.ensure_future(
            infer(served, "tiny-small-queue", [{"input_ids": [2, 10, 3], "token_type_ids": [0] * 3}])
        )
        await until(probe.started.is_set, "the first model call")
        with pytest.raises(grpc.aio.AioRpcError) as rpc_caught:
            await infer(served, "tiny-small-queue", [{"input_ids": marker, "token_type_ids": [0] * 5}], timeout=0.2)
        # The batcher's own check: a queued request whose deadline passes is failed without a model call.
        late = asyncio.ensure_future(
            served.core.infer("tiny-small-queue", ids, None, np.array([0, 5], np.int32), time.monotonic() + 0.05)
        )
        deadline = time.monotonic() + 0.05
        await until(lambda: time.monotonic() > deadline, "the deadline to pass")
    finally:
        probe.gate.set()
    assert rpc_caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await first
    with pytest.raises(errors.TandemError) as caught:
        await late
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert marker not in probe.seen


async def test_a_cancelled_call_is_skipped(served: Served) -> None:
    probe = served.probes.by_model["tiny-small-queue"]
    batcher = served.core.loaded("tiny-small-queue").batcher
    assert batcher is not None
    marker = [2, 96, 95, 3]
    probe.gate.clear()
    probe.started.clear()
    try:
        first = asyncio.ensure_future(
            infer(served, "tiny-small-queue", [{"input_ids": [2, 10, 3], "token_type_ids": [0] * 3}])
        )
        await until(probe.started.is_set, "the first model call")
        request = inference_pb2.InferRequest(model="tiny-small-queue", batch=token_batch([marker]))
        call = served.stub.Infer(request)
        await until(lambda: batcher.pending == 2, "the second call queued")
        call.cancel()
        await until(lambda: batcher.pending == 1, "the cancellation to reach the batcher")
    finally:
        probe.gate.set()
    await first
    with pytest.raises(asyncio.CancelledError):
        await call
    assert marker not in probe.seen


def _raw_batch(ids: Sequence[int], cu: Sequence[int], types: Sequence[int] | None = None) -> tensor_pb2.TokenBatch:
    batch = tensor_pb2.TokenBatch(
        input_ids=tensors.encode(np.array(ids, dtype=np.int64)), cu_seqlens=tensors.encode(np.array(cu, np.int32))
    )
    if types is not None:
        batch.token_type_ids.CopyFrom(tensors.encode(np.array(types, dtype=np.int64)))
    return batch


_FLOAT_IDS = tensor_pb2.TokenBatch(
    input_ids=tensors.encode(np.array([1.0, 2.0], dtype=np.float32)),
    cu_seqlens=tensors.encode(np.array([0, 2], np.int32)),
)


@pytest.mark.parametrize(
    ("model", "batch", "code", "reason", "field_name"),
    [
        ("tiny-embed", tensor_pb2.TokenBatch(), grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_INPUT, "batch"),
        ("tiny-embed", _raw_batch([], [0]), grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_INPUT, "batch"),
        (
            "tiny-embed",
            _raw_batch([2, 3], [0, 3]),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_INPUT,
            "batch.cu_seqlens",
        ),
        (
            "tiny-embed",
            _raw_batch([2, 3], [0, 2], [0]),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_INPUT,
            "batch.token_type_ids",
        ),
        (
            "tiny-embed",
            _raw_batch([2, 3], [0, 2], [0, 5]),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_INPUT,
            "batch.token_type_ids",
        ),
        (
            "tiny-embed",
            _raw_batch([2, 100_000], [0, 2]),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_INPUT,
            "batch.input_ids",
        ),
        (
            "tiny-embed",
            _raw_batch([2, -1], [0, 2]),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_INPUT,
            "batch.input_ids",
        ),
        (
            "tiny-embed",
            _raw_batch([2] * 65, [0, 65]),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INPUT_TOO_LONG,
            "batch.cu_seqlens",
        ),
        (
            "tiny-embed",
            _raw_batch([2, 3], [0, 0, 2]),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_INPUT,
            "batch.cu_seqlens",
        ),
        ("tiny-embed", _FLOAT_IDS, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_INPUT, "batch.input_ids.dtype"),
        (
            "tiny-small-queue",
            _raw_batch([2] * 5, [0, 1, 2, 3, 4, 5]),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.TOO_MANY_INPUTS,
            "batch.cu_seqlens",
        ),
        ("nope", _raw_batch([2], [0, 1]), grpc.StatusCode.NOT_FOUND, Reason.MODEL_NOT_FOUND, None),
        ("tiny-embed:9", _raw_batch([2], [0, 1]), grpc.StatusCode.NOT_FOUND, Reason.MODEL_NOT_FOUND, None),
        ("tiny-embed:x", _raw_batch([2], [0, 1]), grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_INPUT, "model"),
        ("tiny-broken", _raw_batch([2], [0, 1]), grpc.StatusCode.UNAVAILABLE, Reason.MODEL_NOT_READY, None),
    ],
    ids=[
        "no-batch",
        "no-sequences",
        "cu-not-ending-at-total",
        "types-length",
        "types-range",
        "id-over-vocab",
        "negative-id",
        "too-long",
        "empty-sequence",
        "float-ids",
        "over-queue-size",
        "unknown-model",
        "unknown-version",
        "bad-version",
        "failed-model",
    ],
)
async def test_errors_carry_code_and_details(
    served: Served,
    model: str,
    batch: tensor_pb2.TokenBatch,
    code: grpc.StatusCode,
    reason: str,
    field_name: str | None,
) -> None:
    calls_before = {name: probe.calls for name, probe in served.probes.by_model.items()}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Infer(inference_pb2.InferRequest(model=model, batch=batch))
    assert caught.value.code() == code
    details = status_details(caught.value)
    assert details["ErrorInfo"].reason == reason
    assert details["ErrorInfo"].domain == errors.DOMAIN
    if field_name is not None:
        violations = details["BadRequest"].field_violations
        assert [v.field for v in violations] == [field_name]
    if code == grpc.StatusCode.UNAVAILABLE:
        # The failure's cause is in the message, and the caller is told when to come back.
        cause = served.core.model(model).reason
        assert cause and cause in (caught.value.details() or "")
        assert "RetryInfo" in details
    assert {name: probe.calls for name, probe in served.probes.by_model.items()} == calls_before


async def test_a_new_version_takes_over_once_it_is_loaded(tiny_repository: Path, tmp_path: Path) -> None:
    model_dir = copy_model(tiny_repository / "tiny-sentiment", tmp_path / "repo" / "sentiment", backend="torch")
    core = Inference(ModelRepository(tmp_path / "repo", rescan_s=0), home=tmp_path / "home", intra_op_threads=1)
    await core.start()
    ids, cu = np.array([2, 10, 3], dtype=np.int64), np.array([0, 3], dtype=np.int32)
    shutil.copytree(model_dir / "1", model_dir / "2")

    # Until version 2 has loaded, a bare name keeps being answered by version 1; naming 2 says it is loading.
    served, _, _ = await core.infer("sentiment", ids, None, cu, None)
    assert served.version == "1"
    with pytest.raises(errors.TandemError) as caught:
        await core.infer("sentiment:2", ids, None, cu, None)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and caught.value.reason == Reason.MODEL_NOT_READY
    loading = core.loaded("sentiment:2").task
    assert loading is not None
    await loading
    served, _, _ = await core.infer("sentiment", ids, None, cu, None)
    assert served.version == "2"
    assert [(d.version, d.versions, d.ready) for d in core.models()] == [("2", ("1", "2"), True)]
    await core.close()
