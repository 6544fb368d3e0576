"""Tokenizer fingerprints: one hash per version folder that is equal exactly when two tokenizers give equal ids, so
the inference stage can refuse token ids made by another model's tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from services.common.repository import files

# Settings the tokenizer stage sets itself per request; they do not change which ids a text gets.
_RUNTIME_KEYS = ("truncation", "padding")
_VOCABULARY_FILES = (
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def _canonical(data: object) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _token_text(value: object) -> object:
    """AddedToken dicts reduced to their text, so that formatting choices do not change the fingerprint."""
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    if isinstance(value, list):
        return [_token_text(v) for v in value]
    return value


def _special_tokens(path: Path) -> dict[str, object]:
    specials: dict[str, object] = {}
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        for key, value in files.read_json(config_file).items():
            if key.endswith("_token") or key in ("additional_special_tokens", "extra_special_tokens"):
                specials[key] = _token_text(value)
    map_file = path / "special_tokens_map.json"
    if map_file.is_file():
        specials.update({key: _token_text(value) for key, value in files.read_json(map_file).items()})
    return specials


def tokenizer_fingerprint(path: Path) -> str:
    """'sha256:<hex>' of a version's tokenizer: its tokenizer.json in canonical JSON (sorted keys, no truncation or
    padding settings) plus its special tokens; vocabulary files and the whole tokenizer_config.json stand in for a
    missing tokenizer.json. Empty when the folder holds no tokenizer at all. Equal fingerprints mean equal ids."""
    digest = hashlib.sha256()
    tokenizer_file = path / "tokenizer.json"
    if tokenizer_file.is_file():
        tokenizer = files.read_json(tokenizer_file)
        for key in _RUNTIME_KEYS:
            tokenizer.pop(key, None)
        digest.update(b"tokenizer.json\0" + _canonical(tokenizer))
    else:
        found = [name for name in _VOCABULARY_FILES if (path / name).is_file()]
        if not found:
            return ""
        for name in found:
            digest.update(name.encode() + b"\0" + (path / name).read_bytes())
        config_file = path / "tokenizer_config.json"
        if config_file.is_file():
            digest.update(b"tokenizer_config.json\0" + _canonical(files.read_json(config_file)))
    digest.update(b"\0special_tokens\0" + _canonical(_special_tokens(path)))
    return f"sha256:{digest.hexdigest()}"
