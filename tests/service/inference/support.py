"""What the inference stage's service tests share: a probe around each backend, the served stage, requests built by
hand, transformers' own outputs to compare with, and the error details of a call."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from transformers import (
    AutoTokenizer,
)

from services.common import tensors
from services.common.server import RunningServer
from services.inference.backends.base import Backend, BackendOptions, FloatArray, IntArray
from services.inference.core import Inference
from services.inference.loading import create_backend
from tandem.inference.v1 import inference_pb2, inference_pb2_grpc
from tandem.tensor.v1 import tensor_pb2

ATOL = 1e-4


TEXTS = [
    "anna went to paris",
    "the weekend was really great and we saw a new movie about london",
    "i",
    "peter jones visited the old stadium near amsterdam yesterday morning with his family",
]


class ProbeBackend(Backend):
    """Wraps a real backend: records every call and every sequence it sees, and can hold calls at a gate."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.uses_token_type_ids = inner.uses_token_type_ids
        self.runs_alone = inner.runs_alone
        self.calls = 0
        self.alone_calls = 0
        # The thread each lone call ran on.
        self.alone_threads: list[int] = []
        self.seen: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def run(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        self._record(input_ids, attention_mask)
        return self.inner.run(input_ids, attention_mask, token_type_ids)

    def run_alone(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray | None) -> FloatArray:
        self._record(input_ids, attention_mask)
        self.alone_calls += 1
        self.alone_threads.append(threading.get_ident())
        return self.inner.run_alone(input_ids, attention_mask, token_type_ids)

    def _record(self, input_ids: IntArray, attention_mask: IntArray) -> None:
        self.started.set()
        assert self.gate.wait(30)
        self.calls += 1
        self.seen.extend(row[m.astype(bool)].tolist() for row, m in zip(input_ids, attention_mask, strict=True))

    def close(self) -> None:
        self.inner.close()


@dataclass
class Probes:
    by_model: dict[str, ProbeBackend] = field(default_factory=dict)

    def factory(self, model: Any, options: BackendOptions) -> Backend:
        probe = ProbeBackend(create_backend(model, options))
        self.by_model[model.name] = probe
        return probe


@dataclass
class Served:
    core: Inference
    running: RunningServer
    channel: grpc.aio.Channel
    stub: inference_pb2_grpc.InferenceServiceAsyncStub
    probes: Probes
    repo: Path
    health_before_warm_up: int


def set_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "tandem.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def copy_model(source: Path, target: Path, **changes: object) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.onnx"))
    set_config(target, **changes)
    return target


def token_batch(
    seqs: Sequence[Sequence[int]], types: Sequence[Sequence[int]] | None = None, dtype: Any = np.int64
) -> tensor_pb2.TokenBatch:
    cu = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum([len(s) for s in seqs], out=cu[1:])
    batch = tensor_pb2.TokenBatch(
        input_ids=tensors.encode(np.array([t for s in seqs for t in s], dtype=dtype)),
        cu_seqlens=tensors.encode(cu),
    )
    if types is not None:
        batch.token_type_ids.CopyFrom(tensors.encode(np.array([t for s in types for t in s], dtype=np.int64)))
    return batch


def encode_texts(
    model_dir: Path, texts: Sequence[str], pairs: Sequence[str] | None = None
) -> list[dict[str, list[int]]]:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "1"))
    encoded = tokenizer(list(texts), list(pairs) if pairs else None)
    return [
        {"input_ids": ids, "token_type_ids": types}
        for ids, types in zip(encoded["input_ids"], encoded["token_type_ids"], strict=True)
    ]


async def infer(served: Served, model: str, seqs: Sequence[dict[str, list[int]]], **kwargs: Any) -> np.ndarray:
    request = inference_pb2.InferRequest(
        model=model, batch=token_batch([s["input_ids"] for s in seqs], [s["token_type_ids"] for s in seqs])
    )
    response = await served.stub.Infer(request, **kwargs)
    assert response.model == model.partition(":")[0]
    assert response.output.dtype == tensor_pb2.DATA_TYPE_FLOAT32
    return tensors.decode(response.output, "output")


@torch.inference_mode()
def reference(model_dir: Path, auto: Any, seqs: Sequence[dict[str, list[int]]], attr: str) -> list[np.ndarray]:
    """transformers' own outputs, one unpadded sequence at a time."""
    model = auto.from_pretrained(str(model_dir / "1")).eval()
    out = []
    for s in seqs:
        inputs = {k: torch.tensor([v]) for k, v in s.items()}
        out.append(getattr(model(**inputs), attr)[0].numpy())
    return out


def status_details(err: grpc.aio.AioRpcError) -> dict[str, Any]:
    status = rpc_status.from_call(err)
    assert status is not None, "no grpc-status-details-bin"
    found: dict[str, Any] = {}
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.__name__] = message
    return found


async def until(condition: Callable[[], bool], what: str) -> None:
    """Polls from the event loop; the bound only stops a hang and is never asserted on."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")
