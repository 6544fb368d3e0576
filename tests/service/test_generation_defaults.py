"""Generate's unset parameters take the model's generation_config.json defaults, through the four services: a tiny
GPT-2 whose generation_config samples, one whose tandem.json sets default_max_new_tokens, and one whose
generation_config asks for what no request could."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from transformers import AutoTokenizer

from tandem.gateway.v1 import gateway_pb2
from tandem.generation.v1 import generation_pb2
from tandem.management.v1 import management_pb2
from tests.fixtures.tiny_causal import GPT2_PROMPTS, make_gpt2, reference_generate
from tests.harness import Stack, serve_stack
from tests.status import details_of

SAMPLING = {"do_sample": True, "temperature": 5.0, "top_k": 5, "max_new_tokens": 7, "repetition_penalty": 1.2}
PROMPT = GPT2_PROMPTS[2]


def with_generation_config(model_dir: Path, extra: dict[str, Any], tandem: dict[str, Any] | None = None) -> None:
    path = model_dir / "1" / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))
    if tandem:
        config = json.loads((model_dir / "tandem.json").read_text())
        (model_dir / "tandem.json").write_text(json.dumps({**config, **tandem}))


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("defaults-repository")
    source = make_gpt2(tmp_path_factory.mktemp("built"))
    for name in ("sampling", "capped", "broken"):
        shutil.copytree(source, root / name)
    with_generation_config(root / "sampling", SAMPLING)
    with_generation_config(root / "capped", SAMPLING, {"generation": {"default_max_new_tokens": 4}})
    with_generation_config(root / "broken", {"do_sample": True, "top_p": 0})
    async with serve_stack(root, tmp_path_factory.mktemp("home"), preload_tokenizer=False) as served:
        yield served


async def generate(stack: Stack, model: str, **params: Any) -> list[int]:
    request = gateway_pb2.GenerateRequest(
        model=model, prompt=PROMPT, params=generation_pb2.GenerationParams(ignore_eos=True, **params)
    )
    return [i async for r in stack.stub.Generate(request, timeout=60) for i in r.token_ids]


async def test_unset_parameters_are_the_models_sampling_defaults(stack: Stack) -> None:
    unset = await generate(stack, "sampling", seed=11)
    explicit = await generate(
        stack, "sampling", seed=11, temperature=5.0, top_k=5, top_p=1.0, repetition_penalty=1.2, max_new_tokens=7
    )
    assert len(unset) == 7 and unset == explicit
    # Another seed samples another answer somewhere over a few tries (5 candidates a step at temperature 5).
    others = [await generate(stack, "sampling", seed=seed) for seed in (12, 13, 14)]
    assert any(other != unset for other in others)


async def test_a_request_that_sets_temperature_0_decodes_greedily_with_the_models_penalty(stack: Stack) -> None:
    got = await generate(stack, "sampling", temperature=0.0)
    tokenizer: Any = AutoTokenizer.from_pretrained(str(stack.repository / "sampling" / "1"))
    expected, _ = reference_generate(
        stack.repository / "sampling" / "1",
        list(tokenizer(PROMPT)["input_ids"]),
        max_new_tokens=7,
        ignore_eos=True,
        repetition_penalty=1.2,
    )
    assert got == expected


async def test_tandem_json_default_max_new_tokens_wins_over_the_models(stack: Stack) -> None:
    assert len(await generate(stack, "capped", seed=1)) == 4
    assert len(await generate(stack, "capped", seed=1, max_new_tokens=9)) == 9


async def test_a_generation_config_no_request_could_ask_for_fails_the_load(stack: Stack) -> None:
    """As any version whose load fails: not ready for requests, and MODEL_BROKEN with the reason on a load."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stack, "broken")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # The reason comes with it: a caller sees why, not only that it is not ready.
    message = caught.value.details() or ""
    assert message.startswith("model broken:1 is failed: ")
    assert "generation_config.json has top_p 0.0" in message
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.management.LoadModel(management_pb2.LoadModelRequest(name="broken", version="1", wait=True))
    details = details_of(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_BROKEN")
    assert "generation_config.json has top_p 0.0, which no request could ask for" in details.message
