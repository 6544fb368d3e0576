"""The inference stage over a real gRPC channel: outputs equal transformers', batching, admission, errors, health."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DistilBertConfig,
    DistilBertModel,
)

from services.common import errors, tensors
from services.common.repository import ModelRepository
from services.common.server import RunningServer, start_server
from services.common.settings import usable_cpus
from services.inference import core as inference_core
from services.inference.core import Backend, BackendOptions, FloatArray, Inference, IntArray, create_backend
from services.inference.servicer import SERVICE_NAME, registrar
from tandem.inference.v1 import inference_pb2, inference_pb2_grpc
from tandem.model.v1 import model_pb2
from tandem.tensor.v1 import tensor_pb2
from tests.fixtures.reference import reference_embeddings

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
    stub: inference_pb2_grpc.InferenceServiceStub
    probes: Probes
    repo: Path
    health_before_warm_up: int


def _set_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "tandem.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _copy(source: Path, target: Path, **changes: object) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.onnx"))
    _set_config(target, **changes)
    return target


@pytest.fixture(scope="module")
def repo(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of the shared tiny models (exports land in the copies), plus variants and one broken model."""
    root = tmp_path_factory.mktemp("inference-repo")
    _copy(tiny_repository / "tiny-embed", root / "tiny-embed")
    _copy(tiny_repository / "tiny-sentiment", root / "tiny-sentiment")
    # PyTorch-backed variants: same weights, no export, and limits small enough to fill.
    _copy(tiny_repository / "tiny-embed", root / "tiny-embed-torch", backend="torch")
    _copy(tiny_repository / "tiny-ner", root / "tiny-ner", backend="torch")
    _copy(tiny_repository / "tiny-rerank", root / "tiny-rerank", backend="torch")
    # One instance, so a call held at the probe's gate makes the next ones queue behind it.
    _copy(tiny_repository / "tiny-sentiment", root / "tiny-small-queue", backend="torch", max_queue_size=4, instances=1)
    broken = _copy(tiny_repository / "tiny-sentiment", root / "tiny-broken", backend="torch")
    (broken / "1" / "model.safetensors").write_bytes(b"not a safetensors file")
    return root


@pytest_asyncio.fixture(scope="module")
async def served(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    probes = Probes()
    core = Inference(
        ModelRepository(repo), home=tmp_path_factory.mktemp("home"), intra_op_threads=2, backend_factory=probes.factory
    )
    running = await start_server("127.0.0.1:0", [registrar(core)], serving=False)
    channel = grpc.aio.insecure_channel(running.address)
    before = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    await core.start()
    await running.set_serving(True)
    yield Served(core, running, channel, inference_pb2_grpc.InferenceServiceStub(channel), probes, repo, before.status)
    await channel.close()
    await running.stop(0)
    await core.close()


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


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


# ----------------------------------------------------------------------------------------------------------------------
# Serving and model descriptions


async def test_health_is_serving_only_after_warm_up(served: Served) -> None:
    assert served.health_before_warm_up == health_pb2.HealthCheckResponse.NOT_SERVING
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", SERVICE_NAME):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_list_models_describes_every_model(served: Served) -> None:
    response = await served.stub.ListModels(inference_pb2.ListModelsRequest())
    models = {m.name: m for m in response.models}
    assert [m.name for m in response.models] == sorted(models)
    embed = models["tiny-embed"]
    assert (embed.task, embed.version, list(embed.versions)) == (model_pb2.TASK_EMBEDDING, "1", ["1"])
    assert (embed.ready, embed.backend, embed.embedding_dimension, embed.max_input_length) == (
        True,
        "onnxruntime",
        32,
        64,
    )
    sentiment = models["tiny-sentiment"]
    assert sentiment.task == model_pb2.TASK_CLASSIFICATION
    assert list(sentiment.labels) == ["negative", "neutral", "positive"]
    assert not sentiment.multi_label and sentiment.embedding_dimension == 0
    assert models["tiny-ner"].task == model_pb2.TASK_TOKEN_CLASSIFICATION
    assert models["tiny-ner"].backend == "torch"
    assert models["tiny-rerank"].task == model_pb2.TASK_RERANK
    assert not models["tiny-broken"].ready
    assert all(m.ready for name, m in models.items() if name != "tiny-broken")


async def test_get_model_by_name_and_version(served: Served) -> None:
    for ref in ("tiny-sentiment", "tiny-sentiment:1"):
        response = await served.stub.GetModel(inference_pb2.GetModelRequest(model=ref))
        assert (response.model.name, response.model.version, response.model.ready) == ("tiny-sentiment", "1", True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.GetModel(inference_pb2.GetModelRequest(model="tiny-sentiment:7"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# ----------------------------------------------------------------------------------------------------------------------
# Outputs equal transformers' own


async def test_embedding_rows_equal_transformers(served: Served) -> None:
    seqs = encode_texts(served.repo / "tiny-embed", TEXTS)
    got = await infer(served, "tiny-embed", seqs)
    lengths = [len(s["input_ids"]) for s in seqs]
    assert got.shape == (sum(lengths), 32)
    want = np.concatenate(reference(served.repo / "tiny-embed", AutoModel, seqs, "last_hidden_state"))
    np.testing.assert_allclose(got, want, atol=ATOL)


async def test_pooled_embeddings_equal_sentence_transformers_pooling_and_only_embedding_models_pool(
    served: Served,
) -> None:
    """InferRequest.pool: one unnormalized row per sequence, pooled here as the version's 1_Pooling says."""
    seqs = encode_texts(served.repo / "tiny-embed", TEXTS)
    request = inference_pb2.InferRequest(
        model="tiny-embed",
        batch=token_batch([s["input_ids"] for s in seqs], [s["token_type_ids"] for s in seqs]),
        pool=True,
    )
    response = await served.stub.Infer(request)
    got = tensors.decode(response.output, "output")
    assert response.pooled and got.shape == (len(TEXTS), 32)
    want = reference_embeddings(served.repo / "tiny-embed" / "1", TEXTS, normalize=False)
    np.testing.assert_allclose(got, want, atol=ATOL)
    # A classifier has no token rows to pool: it answers its logits, and says they are not pooled rows.
    seqs = encode_texts(served.repo / "tiny-sentiment", TEXTS)
    batch = token_batch([s["input_ids"] for s in seqs])
    plain = await served.stub.Infer(inference_pb2.InferRequest(model="tiny-sentiment", batch=batch))
    asked = await served.stub.Infer(inference_pb2.InferRequest(model="tiny-sentiment", batch=batch, pool=True))
    assert not asked.pooled
    np.testing.assert_array_equal(tensors.decode(asked.output, "output"), tensors.decode(plain.output, "output"))


async def test_classification_logits_equal_transformers(served: Served) -> None:
    seqs = encode_texts(served.repo / "tiny-sentiment", [*TEXTS, "what a terrible boring day", "i love pizza"])
    # INT32 ids are accepted as well as INT64.
    request = inference_pb2.InferRequest(
        model="tiny-sentiment", batch=token_batch([s["input_ids"] for s in seqs], dtype=np.int32)
    )
    response = await served.stub.Infer(request)
    got = tensors.decode(response.output, "output")
    assert (response.model, response.version, got.shape) == ("tiny-sentiment", "1", (len(seqs), 3))
    want = np.stack(reference(served.repo / "tiny-sentiment", AutoModelForSequenceClassification, seqs, "logits"))
    np.testing.assert_allclose(got, want, atol=ATOL)


async def test_token_classification_and_rerank_equal_transformers(served: Served) -> None:
    seqs = encode_texts(served.repo / "tiny-ner", TEXTS)
    got = await infer(served, "tiny-ner", seqs)
    want = np.concatenate(reference(served.repo / "tiny-ner", AutoModelForTokenClassification, seqs, "logits"))
    assert got.shape == want.shape == (sum(len(s["input_ids"]) for s in seqs), 5)
    np.testing.assert_allclose(got, want, atol=ATOL)

    # Pairs: token_type_ids matter here, and must reach the model.
    queries = ["coffee", "coffee", "river bank"]
    documents = ["we had coffee in the morning", "the kitchen was small", "a walk along the river"]
    pairs = encode_texts(served.repo / "tiny-rerank", queries, documents)
    got = await infer(served, "tiny-rerank", pairs)
    want = np.stack(reference(served.repo / "tiny-rerank", AutoModelForSequenceClassification, pairs, "logits"))
    assert got.shape == want.shape == (3, 1)
    np.testing.assert_allclose(got, want, atol=ATOL)


async def test_torch_backend_gives_the_same_numbers(served: Served) -> None:
    seqs = encode_texts(served.repo / "tiny-embed", TEXTS)
    onnx_rows = await infer(served, "tiny-embed", seqs)
    torch_rows = await infer(served, "tiny-embed-torch", seqs)
    np.testing.assert_allclose(torch_rows, onnx_rows, atol=ATOL)
    assert served.core.model("tiny-embed-torch").backend == "torch"


async def test_a_lone_call_runs_on_every_thread_with_the_same_numbers(served: Served) -> None:
    # Two instances of one thread each share the stage's two threads; a call with the model to itself gets both.
    probe = served.probes.by_model["tiny-embed"]
    assert probe.runs_alone and not served.probes.by_model["tiny-embed-torch"].runs_alone
    seqs = encode_texts(served.repo / "tiny-embed", TEXTS[1:2])
    before = probe.alone_calls
    got = await infer(served, "tiny-embed", seqs)
    assert probe.alone_calls == before + 1
    want = np.concatenate(reference(served.repo / "tiny-embed", AutoModel, seqs, "last_hidden_state"))
    np.testing.assert_allclose(got, want, atol=ATOL)
    # Both sessions give the same numbers for a padded batch.
    ids = np.array([[1, 7, 9, 4, 2], [1, 5, 2, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    np.testing.assert_allclose(
        probe.inner.run_alone(ids, mask, np.zeros_like(ids)), probe.inner.run(ids, mask, np.zeros_like(ids)), atol=1e-5
    )


def test_io_binding_gives_the_same_numbers_and_turns_itself_off_if_it_cannot_run(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    # On by default only on a GPU; here it binds on the CPU, which runs the same code but for the device name.
    path = served.repo / "tiny-embed" / "1" / "model.onnx"
    plain = inference_core.OnnxBackend(path, ["CPUExecutionProvider"], threads=1)
    assert not plain.io_binding
    bound = inference_core.OnnxBackend(path, ["CPUExecutionProvider"], threads=1, io_binding=True)
    assert bound.io_binding
    ids = np.array([[1, 7, 9, 4, 2], [1, 5, 2, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    want = plain.run(ids, mask, np.zeros_like(ids))
    np.testing.assert_array_equal(bound.run(ids, mask, None), want)
    # Once a bound call has run, a failing one is an error of that call, not a reason to stop binding.
    bound._bind_device = "no-such-device"
    with pytest.raises(Exception, match="Unsupported device type: no-such-device"):
        bound.run(ids, mask, None)
    # A binding that cannot run the first call (the warm-up) gives way to plain runs, with a warning.
    broken = inference_core.OnnxBackend(path, ["CPUExecutionProvider"], threads=1, io_binding=True)
    broken._bind_device = "no-such-device"
    with caplog.at_level("WARNING", logger="services.inference.core"):
        np.testing.assert_array_equal(broken.run(ids, mask, None), want)
    assert not broken.io_binding
    assert any("I/O binding failed" in r.getMessage() for r in caplog.records)


def test_only_cpu_versions_with_split_threads_get_a_lone_call_session(served: Served, tmp_path: Path) -> None:
    model = served.core.repository.resolve("tiny-embed")
    assert BackendOptions(tmp_path, intra_op_threads=2, device="cpu").alone_threads_of(model) == 2
    assert BackendOptions(tmp_path, intra_op_threads=4, device="cpu", instances=4).alone_threads_of(model) == 4
    # Nothing to gain: one instance already has every thread, or one thread is all there is.
    assert BackendOptions(tmp_path, intra_op_threads=2, device="cpu", instances=1).alone_threads_of(model) == 0
    assert BackendOptions(tmp_path, intra_op_threads=1, device="cpu").alone_threads_of(model) == 0
    # Turned off by the stage, or by tandem.json.
    assert BackendOptions(tmp_path, intra_op_threads=2, device="cpu", run_alone=False).alone_threads_of(model) == 0
    off = dataclasses.replace(model, config=model.config.model_copy(update={"run_alone": False}))
    assert BackendOptions(tmp_path, intra_op_threads=2, device="cpu").alone_threads_of(off) == 0
    # A GPU runs one call at a time by default; with instances set, the calls share the device, not threads.
    assert BackendOptions(tmp_path, intra_op_threads=2, device="cuda", instances=2).alone_threads_of(model) == 0


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="affinity masks are a Linux feature")
def test_default_threads_are_the_cpus_the_process_may_use(tmp_path: Path) -> None:
    # A process pinned to one CPU (as by taskset, or a container's cpuset) runs one model thread, not one per core.
    mask = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(mask)})
        pinned = Inference(ModelRepository(tmp_path), home=tmp_path, watch_s=None).options.intra_op_threads
    finally:
        os.sched_setaffinity(0, mask)
    assert pinned == 1
    # Unpinned: every CPU of the mask, unless a container CPU quota allows fewer.
    assert 1 <= usable_cpus() <= len(mask) <= (os.cpu_count() or 1)
    assert Inference(ModelRepository(tmp_path), home=tmp_path, watch_s=None).options.intra_op_threads == usable_cpus()


# ----------------------------------------------------------------------------------------------------------------------
# ONNX export


async def test_onnx_export_is_written_beside_the_model_and_reused(served: Served, tmp_path: Path) -> None:
    exported = served.repo / "tiny-embed" / "1" / "model.onnx"
    assert exported.is_file()
    assert not (served.repo / "tiny-embed-torch" / "1" / "model.onnx").exists()
    stamp = exported.stat().st_mtime_ns
    model = served.core.repository.resolve("tiny-embed")
    path, fresh = inference_core.ensure_onnx(model, tmp_path, threads=1)
    assert (path, fresh) == (exported, False)
    # A second server over the same repository loads the graph without exporting again.
    again = Inference(ModelRepository(_only(served.repo, "tiny-embed", tmp_path / "repo")), home=tmp_path)
    await again.start()
    seqs = encode_texts(served.repo / "tiny-embed", TEXTS[:2])
    ids = np.array([t for s in seqs for t in s["input_ids"]], dtype=np.int64)
    cu = np.array([0, len(seqs[0]["input_ids"]), len(ids)], dtype=np.int32)
    _, rows, _ = await again.infer("tiny-embed", ids, None, cu, None)
    await again.close()
    assert exported.stat().st_mtime_ns == stamp
    assert not (tmp_path / "onnx-cache").exists()
    np.testing.assert_allclose(rows, await infer(served, "tiny-embed", seqs), atol=ATOL)


def _only(repo: Path, name: str, target: Path) -> Path:
    """A repository holding one model of `repo` through a symlink, so its files (and export) are shared."""
    target.mkdir()
    os.symlink(repo / name, target / name)
    return target


async def test_export_without_token_type_ids_goes_to_the_cache_when_the_folder_is_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DistilBERT's forward() takes no token_type_ids, so neither does its graph.
    model_dir = tmp_path / "repo" / "tiny-distil"
    version = model_dir / "1"
    config = DistilBertConfig(
        vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32, pad_token_id=0
    )
    torch.manual_seed(0)
    DistilBertModel(config).save_pretrained(str(version))
    (model_dir / "tandem.json").write_text(json.dumps({"task": "embedding"}))
    # Running as root, nothing is read-only; the probe that decides stands in for the real thing.
    monkeypatch.setattr(inference_core, "_writable", lambda folder: False)

    core = Inference(ModelRepository(tmp_path / "repo"), home=tmp_path / "home", intra_op_threads=1)
    await core.start()
    assert core.model("tiny-distil").ready, core.model("tiny-distil").reason
    backend = core.loaded("tiny-distil").backend
    assert isinstance(backend, inference_core.OnnxBackend) and not backend.uses_token_type_ids
    assert backend.path == tmp_path / "home" / "onnx-cache" / "tiny-distil" / "1" / "model.onnx"
    assert not (version / "model.onnx").exists()
    seqs = [[1, 5, 7, 9, 2], [1, 8, 2]]
    ids = np.array([t for s in seqs for t in s], dtype=np.int64)
    _, rows, _ = await core.infer("tiny-distil", ids, np.zeros_like(ids), np.array([0, 5, 8], dtype=np.int32), None)
    await core.close()
    hf = DistilBertModel.from_pretrained(str(version)).eval()
    with torch.inference_mode():
        want = np.concatenate([hf(input_ids=torch.tensor([s])).last_hidden_state[0].numpy() for s in seqs])
    np.testing.assert_allclose(rows, want, atol=ATOL)


# ----------------------------------------------------------------------------------------------------------------------
# Dynamic batching over the wire


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
    assert details["ErrorInfo"].reason == errors.QUEUE_FULL
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


# ----------------------------------------------------------------------------------------------------------------------
# Errors: code and details


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
        ("tiny-embed", tensor_pb2.TokenBatch(), grpc.StatusCode.INVALID_ARGUMENT, errors.INVALID_INPUT, "batch"),
        ("tiny-embed", _raw_batch([], [0]), grpc.StatusCode.INVALID_ARGUMENT, errors.INVALID_INPUT, "batch"),
        (
            "tiny-embed",
            _raw_batch([2, 3], [0, 3]),
            grpc.StatusCode.INVALID_ARGUMENT,
            errors.INVALID_INPUT,
            "batch.cu_seqlens",
        ),
        (
            "tiny-embed",
            _raw_batch([2, 3], [0, 2], [0]),
            grpc.StatusCode.INVALID_ARGUMENT,
            errors.INVALID_INPUT,
            "batch.token_type_ids",
        ),
        (
            "tiny-embed",
            _raw_batch([2, 3], [0, 2], [0, 5]),
            grpc.StatusCode.INVALID_ARGUMENT,
            errors.INVALID_INPUT,
            "batch.token_type_ids",
        ),
        (
            "tiny-embed",
            _raw_batch([2, 100_000], [0, 2]),
            grpc.StatusCode.INVALID_ARGUMENT,
            errors.INVALID_INPUT,
            "batch.input_ids",
        ),
        (
            "tiny-embed",
            _raw_batch([2, -1], [0, 2]),
            grpc.StatusCode.INVALID_ARGUMENT,
            errors.INVALID_INPUT,
            "batch.input_ids",
        ),
        (
            "tiny-embed",
            _raw_batch([2] * 65, [0, 65]),
            grpc.StatusCode.INVALID_ARGUMENT,
            errors.INPUT_TOO_LONG,
            "batch.cu_seqlens",
        ),
        (
            "tiny-embed",
            _raw_batch([2, 3], [0, 0, 2]),
            grpc.StatusCode.INVALID_ARGUMENT,
            errors.INVALID_INPUT,
            "batch.cu_seqlens",
        ),
        ("tiny-embed", _FLOAT_IDS, grpc.StatusCode.INVALID_ARGUMENT, errors.INVALID_INPUT, "batch.input_ids.dtype"),
        (
            "tiny-small-queue",
            _raw_batch([2] * 5, [0, 1, 2, 3, 4, 5]),
            grpc.StatusCode.INVALID_ARGUMENT,
            errors.TOO_MANY_INPUTS,
            "batch.cu_seqlens",
        ),
        ("nope", _raw_batch([2], [0, 1]), grpc.StatusCode.NOT_FOUND, errors.MODEL_NOT_FOUND, None),
        ("tiny-embed:9", _raw_batch([2], [0, 1]), grpc.StatusCode.NOT_FOUND, errors.MODEL_NOT_FOUND, None),
        ("tiny-embed:x", _raw_batch([2], [0, 1]), grpc.StatusCode.INVALID_ARGUMENT, errors.INVALID_INPUT, "model"),
        ("tiny-broken", _raw_batch([2], [0, 1]), grpc.StatusCode.UNAVAILABLE, errors.MODEL_NOT_READY, None),
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
        assert cause and cause in caught.value.details()
        assert "RetryInfo" in details
    assert {name: probe.calls for name, probe in served.probes.by_model.items()} == calls_before


async def test_a_new_version_takes_over_once_it_is_loaded(tiny_repository: Path, tmp_path: Path) -> None:
    model_dir = _copy(tiny_repository / "tiny-sentiment", tmp_path / "repo" / "sentiment", backend="torch")
    core = Inference(ModelRepository(tmp_path / "repo", rescan_s=0), home=tmp_path / "home", intra_op_threads=1)
    await core.start()
    ids, cu = np.array([2, 10, 3], dtype=np.int64), np.array([0, 3], dtype=np.int32)
    shutil.copytree(model_dir / "1", model_dir / "2")

    # Until version 2 has loaded, a bare name keeps being answered by version 1; naming 2 says it is loading.
    served, _, _ = await core.infer("sentiment", ids, None, cu, None)
    assert served.version == "1"
    with pytest.raises(errors.TandemError) as caught:
        await core.infer("sentiment:2", ids, None, cu, None)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and caught.value.reason == errors.MODEL_NOT_READY
    loading = core.loaded("sentiment:2").task
    assert loading is not None
    await loading
    served, _, _ = await core.infer("sentiment", ids, None, cu, None)
    assert served.version == "2"
    assert [(d.version, d.versions, d.ready) for d in core.models()] == [("2", ("1", "2"), True)]
    await core.close()
