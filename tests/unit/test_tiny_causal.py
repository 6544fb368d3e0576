"""Checks that the tiny causal LMs build as documented: layout, tokenizers, chat template and greedy continuations."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from tests.fixtures.tiny_causal import (
    CHAT_PROMPTS,
    CONTEXT,
    CYCLE,
    END,
    GPT2_PROMPTS,
    cycle_text,
    expected_continuation,
    make_gpt2,
    make_llama_chat,
    reference_generate,
)

MULTIBYTE = [item for item in CYCLE if not item.isascii()]
NAMES = ("tiny-gpt2", "tiny-llama-chat")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both models built once into one repository: {name: version folder}. Prints each build's time (`-s`)."""
    root = tmp_path_factory.mktemp("causal-repository")
    out: dict[str, Path] = {}
    for make in (make_gpt2, make_llama_chat):
        t0 = time.perf_counter()
        model_dir = make(root)
        print(f"\nbuilt {model_dir.name} in {time.perf_counter() - t0:.1f}s")
        out[model_dir.name] = model_dir / "1"
    return out


@pytest.fixture(scope="module")
def tokenizers(built: dict[str, Path]) -> dict[str, Any]:
    return {name: AutoTokenizer.from_pretrained(str(vdir)) for name, vdir in built.items()}


def _ids(tokenizer: Any, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _ids(tokenizer, text, special=False)


def test_layout(built: dict[str, Path]) -> None:
    assert sorted(built) == sorted(NAMES)
    for name, vdir in built.items():
        assert json.loads((vdir.parent / "tandem.json").read_text()) == {
            "task": "text-generation",
            "backend": "torch",
            "max_length": CONTEXT,
        }
        for f in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ):
            assert (vdir / f).is_file(), f"{name}: missing {f}"
        config = json.loads((vdir / "config.json").read_text())
        assert config["max_position_embeddings" if name == "tiny-llama-chat" else "n_positions"] == CONTEXT
        assert config["num_hidden_layers" if name == "tiny-llama-chat" else "n_layer"] == 2
    assert (built["tiny-llama-chat"] / "chat_template.jinja").is_file()
    assert not (built["tiny-gpt2"] / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((built["tiny-gpt2"] / "tokenizer_config.json").read_text())


def test_tokenizers(tokenizers: dict[str, Any]) -> None:
    gpt2, llama = tokenizers["tiny-gpt2"], tokenizers["tiny-llama-chat"]
    assert gpt2.chat_template is None and llama.chat_template is not None
    assert gpt2.eos_token == gpt2.bos_token == "<|endoftext|>" and gpt2.pad_token not in (None, gpt2.eos_token)
    assert (llama.bos_token, llama.eos_token) == ("<s>", "</s>") and llama.pad_token is not None
    assert 300 <= len(gpt2) <= 500 and 300 <= len(llama) <= 500
    assert _ids(gpt2, "sun")[0] != gpt2.bos_token_id and _ids(llama, "sun")[0] == llama.bos_token_id
    for item in MULTIBYTE:  # never merged: each non-ASCII character is one token per UTF-8 byte
        n_bytes = sum(len(c.encode()) for c in item if not c.isascii())
        for tokenizer in (gpt2, llama):
            ids = _ids(tokenizer, f"sun {item}", special=False)
            pieces = [tokenizer.decode([i]) for i in ids]
            assert len(ids) >= 1 + n_bytes and not any(c in p for p in pieces for c in item if not c.isascii()), pieces
            assert tokenizer.decode(ids) == f"sun {item}"
        assert sum(t.startswith("<0x") for t in llama.tokenize(item)) == n_bytes
    text = cycle_text(3, 15)
    for tokenizer in (gpt2, llama):  # items tokenize alike wherever they are, so continuations are prefix-stable
        assert tokenizer.decode(_ids(tokenizer, text), skip_special_tokens=True) == text


def test_expected_continuation() -> None:
    assert expected_continuation("sun 🍎 moon") == " 猫 star 東京 café 🐍 rain 🌊"
    assert expected_continuation("rain 🌊") == ""
    assert expected_continuation("🐍 rain 🌊 sun") == " 🍎 moon 猫 star 東京 café 🐍 rain 🌊"
    assert expected_continuation("猫 star", chat=True) == "東京 café 🐍 rain 🌊"
    for bad in ("sun moon", "dog", "sun  🍎"):
        with pytest.raises(ValueError):
            expected_continuation(bad)
    with pytest.raises(ValueError):
        expected_continuation("rain 🌊", chat=True)
    assert len(set(map(len, GPT2_PROMPTS))) >= 8 and len(set(map(len, CHAT_PROMPTS))) >= 8


@pytest.mark.parametrize("name", NAMES)
def test_greedy_raw_prompts(name: str, built: dict[str, Path], tokenizers: dict[str, Any]) -> None:
    tokenizer, eos = tokenizers[name], tokenizers[name].eos_token_id
    for prompt in GPT2_PROMPTS:
        ids = _ids(tokenizer, prompt)
        cont = _ids(tokenizer, prompt + expected_continuation(prompt))[len(ids) :]
        generated, logprobs = reference_generate(built[name], ids, max_new_tokens=64)
        assert logprobs is None
        assert generated == [*cont, eos], prompt  # stops right after the EOS
        assert tokenizer.decode(ids + generated, skip_special_tokens=True) == prompt + expected_continuation(prompt)


def test_greedy_chat(built: dict[str, Path], tokenizers: dict[str, Any]) -> None:
    tokenizer, vdir = tokenizers["tiny-llama-chat"], built["tiny-llama-chat"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos_ids = json.loads((vdir / "generation_config.json").read_text())["eos_token_id"]
    assert eos_ids == [tokenizer.eos_token_id, im_end]
    for prompt in CHAT_PROMPTS:
        for system in ([], [{"role": "system", "content": "Be brief."}]):
            ids = _chat_ids(tokenizer, [*system, {"role": "user", "content": prompt}])
            generated, _ = reference_generate(vdir, ids, max_new_tokens=64)
            assert generated[-1] == im_end, prompt
            assert tokenizer.decode(generated, skip_special_tokens=True) == expected_continuation(prompt, chat=True)


def test_chat_template(tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers["tiny-llama-chat"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sun 🍎"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nsun 🍎<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == no_prompt + "<|im_start|>assistant\n"
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)  # transformers 5: a BatchEncoding
    assert list(encoded["input_ids"]) == _ids(tokenizer, text, special=False)
    assert encoded["input_ids"][0] == tokenizer.bos_token_id
    with pytest.raises(Exception, match="roles must be"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_eos_controls_gpt2(built: dict[str, Path], tokenizers: dict[str, Any]) -> None:
    tokenizer, vdir = tokenizers["tiny-gpt2"], built["tiny-gpt2"]
    eos, prompt = tokenizer.eos_token_id, "moon 猫"
    ids = _ids(tokenizer, prompt)
    cont = _ids(tokenizer, prompt + expected_continuation(prompt))[len(ids) :]
    n = len(cont)
    # max_new_tokens cuts mid-character: "🐍" is 4 byte tokens
    cut = next(i for i in range(n) if tokenizer.decode(cont[:i]).endswith("\ufffd"))
    assert reference_generate(vdir, ids, max_new_tokens=cut)[0] == cont[:cut]
    # EOS suppressed: the cycle goes on with " sun" up to the next END, then EOS
    again = _ids(tokenizer, prompt + expected_continuation(prompt) + " " + cycle_text(0, len(CYCLE)))[len(ids) :]
    generated, logprobs = reference_generate(vdir, ids, max_new_tokens=80, min_new_tokens=n + 1, output_logprobs=True)
    assert generated == [*again, eos]
    assert logprobs is not None and len(logprobs) == len(generated)
    assert all(row[eos] == -math.inf for row in logprobs[: n + 1]) and logprobs[n + 1][eos] > -math.inf
    # ignore_eos: the EOS is emitted, then a new document starts at CYCLE[0], up to max_new_tokens
    after = _ids(tokenizer, cycle_text(0, 2 * len(CYCLE)))
    generated, _ = reference_generate(vdir, ids, max_new_tokens=n + 20, ignore_eos=True)
    assert generated == [*cont, eos, *after[:19]]


def test_logprobs(built: dict[str, Path], tokenizers: dict[str, Any]) -> None:
    tokenizer, vdir = tokenizers["tiny-llama-chat"], built["tiny-llama-chat"]
    ids = _ids(tokenizer, "star 東京")
    generated, logprobs = reference_generate(vdir, ids, max_new_tokens=64, output_logprobs=True)
    raw = reference_generate(vdir, ids, max_new_tokens=64, output_logprobs=True, raw_logprobs=True)
    assert logprobs is not None and raw[0] == generated and raw[1] is not None
    for row, raw_row, token in zip(logprobs, raw[1], generated, strict=True):
        assert len(row) == len(tokenizer) and max(range(len(row)), key=row.__getitem__) == token
        assert abs(math.fsum(math.exp(x) for x in row) - 1) < 1e-4
        assert row == pytest.approx(raw_row, abs=1e-5)  # nothing processes the scores here
    # the EOS decision is confident enough for greedy decoding to agree across implementations
    assert logprobs[-1][generated[-1]] > math.log(0.6)
    # a repetition penalty changes the scores (prompt tokens are penalised from the first step)
    penalised, rows = reference_generate(vdir, ids, max_new_tokens=8, repetition_penalty=1.3, output_logprobs=True)
    assert rows is not None and len(rows) == len(penalised) and rows[0] != logprobs[0]
    # chat: with the EOS suppressed the answer goes on with " sun"
    chat = _chat_ids(tokenizer, [{"role": "user", "content": "rain"}])
    answer = reference_generate(vdir, chat, max_new_tokens=6, min_new_tokens=6)[0]
    assert tokenizer.decode(answer).startswith(f"{END} sun")
