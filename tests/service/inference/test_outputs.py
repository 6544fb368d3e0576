"""The inference stage over a real gRPC channel: health only once warm, model descriptions, outputs equal to
transformers' on the ONNX and PyTorch backends (lone calls and I/O binding too), and where ONNX exports are written."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DistilBertConfig,
    DistilBertModel,
)

from services.common import tensors
from services.common.repository import ModelRepository
from services.inference.backends import onnx as onnx_backend
from services.inference.backends.base import BackendOptions
from services.inference.core import Inference
from services.inference.export import onnx as onnx_export
from services.inference.servicer import SERVICE_NAME
from tandem.inference.v1 import inference_pb2
from tandem.model.v1 import model_pb2
from tests.fixtures.reference import reference_embeddings
from tests.service.inference.support import (
    ATOL,
    TEXTS,
    Probes,
    Served,
    encode_texts,
    infer,
    reference,
    token_batch,
)

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
    got = np.asarray(tensors.decode(response.output, "output"), dtype=np.float32)
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
    got = np.asarray(tensors.decode(response.output, "output"), dtype=np.float32)
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


async def test_a_short_lone_call_runs_on_the_event_loop_thread_with_the_same_numbers(
    served: Served, tmp_path: Path
) -> None:
    seqs = encode_texts(served.repo / "tiny-embed", TEXTS[1:2])
    want = np.concatenate(reference(served.repo / "tiny-embed", AutoModel, seqs, "last_hidden_state"))
    probes = Probes()
    core = Inference(
        ModelRepository(_only(served.repo, "tiny-embed", tmp_path / "repo")),
        home=tmp_path / "home",
        intra_op_threads=2,
        inline_lone_ms=60_000,
        backend_factory=probes.factory,
    )
    await core.start()
    try:
        probe = probes.by_model["tiny-embed"]
        warm_up = len(probe.alone_threads)  # loading ran the lone session once, on the loading thread
        ids = np.array(seqs[0]["input_ids"], dtype=np.int64)
        cu = np.array([0, len(ids)], dtype=np.int32)
        for _ in range(2):
            _, rows, _ = await core.infer("tiny-embed", ids, None, cu, None)
            np.testing.assert_allclose(rows, want, atol=ATOL)
        # Both ran alone: the first on a worker thread (nothing timed yet), the second on this event loop's thread.
        loop_thread = threading.get_ident()
        assert [thread == loop_thread for thread in probe.alone_threads[warm_up:]] == [False, True]
    finally:
        await core.close()


def test_io_binding_gives_the_same_numbers_and_turns_itself_off_if_it_cannot_run(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    # On by default only on a GPU; here it binds on the CPU, which runs the same code but for the device name.
    path = served.repo / "tiny-embed" / "1" / "model.onnx"
    plain = onnx_backend.OnnxBackend(path, ["CPUExecutionProvider"], threads=1)
    assert not plain.io_binding
    bound = onnx_backend.OnnxBackend(path, ["CPUExecutionProvider"], threads=1, io_binding=True)
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
    broken = onnx_backend.OnnxBackend(path, ["CPUExecutionProvider"], threads=1, io_binding=True)
    broken._bind_device = "no-such-device"
    with caplog.at_level("WARNING", logger="services.inference.backends.onnx"):
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


# ----------------------------------------------------------------------------------------------------------------------
# ONNX export


async def test_onnx_export_is_written_beside_the_model_and_reused(served: Served, tmp_path: Path) -> None:
    exported = served.repo / "tiny-embed" / "1" / "model.onnx"
    assert exported.is_file()
    assert not (served.repo / "tiny-embed-torch" / "1" / "model.onnx").exists()
    stamp = exported.stat().st_mtime_ns
    model = served.core.repository.resolve("tiny-embed")
    path, fresh = onnx_export.ensure_onnx(model, tmp_path, threads=1)
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
    monkeypatch.setattr(onnx_export, "_writable", lambda folder: False)

    core = Inference(ModelRepository(tmp_path / "repo"), home=tmp_path / "home", intra_op_threads=1)
    await core.start()
    assert core.model("tiny-distil").ready, core.model("tiny-distil").reason
    backend = core.loaded("tiny-distil").backend
    assert isinstance(backend, onnx_backend.OnnxBackend) and not backend.uses_token_type_ids
    assert backend.path == tmp_path / "home" / "onnx-cache" / "tiny-distil" / "1" / "model.onnx"
    assert not (version / "model.onnx").exists()
    seqs = [[1, 5, 7, 9, 2], [1, 8, 2]]
    ids = np.array([t for s in seqs for t in s], dtype=np.int64)
    _, rows, _ = await core.infer("tiny-distil", ids, np.zeros_like(ids), np.array([0, 5, 8], dtype=np.int32), None)
    await core.close()
    hf = DistilBertModel.from_pretrained(str(version)).eval()  # type: ignore[no-untyped-call]
    with torch.inference_mode():
        want = np.concatenate([hf(input_ids=torch.tensor([s])).last_hidden_state[0].numpy() for s in seqs])
    np.testing.assert_allclose(rows, want, atol=ATOL)
