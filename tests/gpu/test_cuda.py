"""On a CUDA GPU: the torch backend in float32 and float16 against the CPU, the batcher's token budget with the model
on the GPU, ONNX Runtime's CUDA provider with I/O binding (where onnxruntime-gpu is installed), and generation in
float16 against Hugging Face generate() on the same GPU. Skipped without a GPU; scripts/gpu_check.sh runs them on
the GPU machine this workplace may lend, and its --dry-run runs them on the CPU (TANDEM_GPU_TESTS_ON_CPU=1) so that
the tests themselves are known to work before a GPU is lent."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.repository import ModelRepository, ModelVersion
from services.inference.backends.base import BackendOptions
from services.inference.backends.torch import TorchBackend
from services.inference.batching.batcher import Batcher

ON_CPU = os.environ.get("TANDEM_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
pytestmark = pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = [
    "a short one",
    "the quick brown fox jumps over the lazy dog and keeps running far into the hills",
    "gpu",
    "tokens of very different lengths make the batcher pad, split and sort the calls it runs",
    "another sentence of moderate length for the model",
    "x y z",
]


def configured(source: Path, root: Path, name: str, **config: Any) -> ModelVersion:
    """A copy of a tiny model's folder under `root`/`name` with tandem.json overridden by `config`."""
    target = root / name
    shutil.copytree(source, target)
    tandem = json.loads((target / "tandem.json").read_text())
    (target / "tandem.json").write_text(json.dumps({**tandem, **config}))
    return ModelRepository(root).resolve(name)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from tests.fixtures.tiny_models import make_embedding_model

    root = tmp_path_factory.mktemp("gpu-models")
    yield make_embedding_model(root)


def encode(version: ModelVersion, texts: list[str]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    tokenizer: Any = AutoTokenizer.from_pretrained(str(version.path))
    enc = tokenizer(texts, padding=True, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def mean_pooled(hidden: np.ndarray[Any, Any], mask: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    m = mask[..., None].astype(np.float32)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)  # type: ignore[no-any-return]


def test_torch_backend_on_cuda_matches_cpu(embedder: Path, tmp_path: Path) -> None:
    version = configured(embedder, tmp_path, "on-gpu", backend="torch", device=DEVICE)
    ids, mask = encode(version, TEXTS)
    gpu = TorchBackend(version, DEVICE, 1)
    assert gpu.device.type == DEVICE
    on_gpu = gpu.run(ids, mask, None)
    on_cpu = TorchBackend(version, "cpu", 1).run(ids, mask, None)
    assert on_gpu.dtype == np.float32 and on_gpu.shape == on_cpu.shape
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-4, rtol=1e-3)


def test_float16_on_cuda_close_to_float32(embedder: Path, tmp_path: Path) -> None:
    version = configured(embedder, tmp_path, "half", backend="torch", device=DEVICE, dtype="float16")
    ids, mask = encode(version, TEXTS)
    half = TorchBackend(version, DEVICE, 1)
    assert next(half.module.parameters()).dtype == torch.float16
    out = half.run(ids, mask, None)
    assert out.dtype == np.float32  # served as float32 whatever the model computes in
    full = configured(embedder, tmp_path, "full", backend="torch", device="cpu")
    expected = TorchBackend(full, "cpu", 1).run(ids, mask, None)
    cosines = (mean_pooled(out, mask) * mean_pooled(expected, mask)).sum(1)
    assert cosines.min() > 0.999, cosines


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []

    def queued(self, seconds: float) -> None:
        pass

    def batch(self, rows: int, padded_tokens: int, seconds: float) -> None:
        self.batches.append((rows, padded_tokens))


async def test_batcher_token_budget_on_cuda(embedder: Path, tmp_path: Path) -> None:
    """Concurrent requests are merged into GPU calls that never pass max_batch_tokens padded tokens, and every
    caller gets its own rows back, equal to its sequence run alone on the CPU."""
    budget = 48
    version = configured(
        embedder, tmp_path, "budget", backend="torch", device=DEVICE, dtype="float16", max_batch_tokens=budget
    )
    recorder = Recorder()
    batcher = Batcher(TorchBackend(version, DEVICE, 1), version.config, version.ref, 0, recorder, instances=1)
    cpu = TorchBackend(configured(embedder, tmp_path, "budget-cpu", backend="torch", device="cpu"), "cpu", 1)
    tokenizer: Any = AutoTokenizer.from_pretrained(str(version.path))
    sequences = [np.asarray(tokenizer(text)["input_ids"], dtype=np.int64) for text in TEXTS * 8]
    try:
        outputs = await asyncio.gather(
            *(batcher.submit(ids, None, np.asarray([0, len(ids)], dtype=np.int32), None) for ids in sequences)
        )
    finally:
        await batcher.close()
    assert recorder.batches and all(padded <= budget for _, padded in recorder.batches), recorder.batches
    assert max(rows for rows, _ in recorder.batches) > 1, recorder.batches  # requests were merged
    for ids, out in zip(sequences, outputs, strict=True):
        alone = cpu.run(ids[None, :], np.ones_like(ids)[None, :], None)[0]
        assert out.shape == alone.shape
        cos = (out * alone).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(alone, axis=1))
        assert cos.min() > 0.999, cos


def test_onnx_runtime_cuda_provider_with_io_binding(embedder: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed (the CPU build has no CUDA provider)")
    from services.inference.loading import create_backend

    version = configured(embedder, tmp_path, "ort-gpu", backend="onnx", device=DEVICE)
    options = BackendOptions(home=tmp_path / "home", intra_op_threads=1)
    backend = create_backend(version, options)
    assert backend.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")  # type: ignore[attr-defined]
    assert backend.io_binding
    ids, mask = encode(version, TEXTS)
    expected = TorchBackend(configured(embedder, tmp_path, "ort-ref", backend="torch", device="cpu"), "cpu", 1)
    np.testing.assert_allclose(backend.run(ids, mask, None), expected.run(ids, mask, None), atol=1e-3, rtol=1e-3)


def test_generation_in_float16_equals_generate_on_the_same_gpu(tmp_path: Path) -> None:
    from services.inference.generation.engine import GenerationEngine
    from services.inference.generation.sampler import SamplingParams
    from tests.fixtures.tiny_causal import GPT2_PROMPTS, make_gpt2

    source = make_gpt2(tmp_path / "built")
    version = configured(source, tmp_path / "repo", "half-gpt2", dtype="float16", device=DEVICE)
    engine = GenerationEngine(version, DEVICE, 1)
    assert engine.device.type == DEVICE and engine.hf.dtype == torch.float16
    tokenizer: Any = AutoTokenizer.from_pretrained(str(version.path))
    hf: Any = AutoModelForCausalLM.from_pretrained(str(version.path), dtype=torch.float16)
    hf = hf.to(DEVICE).eval()
    hf.generation_config.eos_token_id = None  # EOS is an ordinary token here, as with ignore_eos

    async def ours(ids: list[int]) -> list[int]:
        out: list[int] = []
        async for step in engine.generate(ids, SamplingParams(max_new_tokens=16, ignore_eos=True), None):
            out.extend(step.token_ids)
        return out

    async def together(prompts: list[list[int]]) -> list[list[int]]:
        try:
            return list(await asyncio.gather(*(ours(ids) for ids in prompts)))
        finally:
            engine.close()

    prompts = [list(tokenizer(p)["input_ids"]) for p in GPT2_PROMPTS[:4]]
    results = asyncio.run(together(prompts))
    for ids, got in zip(prompts, results, strict=True):
        with torch.inference_mode():
            tensor = torch.tensor([ids], device=DEVICE)
            expected = hf.generate(
                input_ids=tensor,
                attention_mask=torch.ones_like(tensor),
                do_sample=False,
                max_new_tokens=16,
                pad_token_id=hf.generation_config.pad_token_id,
            )[0, len(ids) :].tolist()
        assert got == expected
