"""Tokenization domain: texts to ragged token batches with the model's Hugging Face fast tokenizer."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import tokenizers
from transformers import AutoTokenizer

from services.common import errors
from services.common.errors import Reason
from services.common.repository import ModelRepository, ModelVersion, Task, tokenizer_fingerprint

log = logging.getLogger(__name__)

# Below this many characters a batch is tokenized on the event loop: the Rust tokenizer takes microseconds,
# less than a hop to a thread. Above it, a worker thread keeps the loop free.
_INLINE_CHARS = 4096


@dataclass(frozen=True)
class TokenizeOptions:
    truncate: bool = True
    add_special_tokens: bool = True
    return_offsets: bool = False
    return_tokens: bool = False


@dataclass
class Encoded:
    """A ragged batch: sequence i is rows cu_seqlens[i]:cu_seqlens[i+1] of every per-token array."""

    model: str
    version: str
    input_ids: npt.NDArray[np.int64]
    token_type_ids: npt.NDArray[np.int64]
    cu_seqlens: npt.NDArray[np.int32]
    offsets: npt.NDArray[np.int32] | None = None
    special_tokens_mask: npt.NDArray[np.uint8] | None = None
    word_ids: npt.NDArray[np.int32] | None = None
    tokens: list[list[str]] | None = None
    # tokenizer_fingerprint() of the version folder whose tokenizer made the ids.
    tokenizer_fingerprint: str = ""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    """A generation prompt's token ids, and whose tokenizer made them."""

    model: str
    version: str
    ids: list[int]
    tokenizer_fingerprint: str
    context_length: int


class LoadedTokenizer:
    """One model version's tokenizer: a truncating and a non-truncating copy, since settings are shared state."""

    def __init__(self, model: ModelVersion) -> None:
        self.model = model
        hf = AutoTokenizer.from_pretrained(str(model.path), use_fast=True)
        backend = getattr(hf, "backend_tokenizer", None)
        if not isinstance(backend, tokenizers.Tokenizer):
            raise ValueError(f"{model.name}:{model.version} has no fast tokenizer (tokenizer.json)")
        serialized = backend.to_str()
        # The Hugging Face tokenizer renders chat templates (its apply_chat_template, with the template's own jinja
        # environment and special-token variables); the Rust tokenizers below do the encoding.
        self.hf = hf
        self.plain = tokenizers.Tokenizer.from_str(serialized)
        self.plain.no_truncation()
        self.plain.no_padding()
        self.truncating = tokenizers.Tokenizer.from_str(serialized)
        self.truncating.enable_truncation(model.max_length)
        self.truncating.no_padding()
        self.vocab_size = self.plain.get_vocab_size(with_added_tokens=True)
        # The inference stage compares it with its own for the version, so both must have read the same files.
        self.fingerprint = tokenizer_fingerprint(model.path)

    def encode(self, texts: Sequence[str], pairs: Sequence[str], options: TokenizeOptions) -> Encoded:
        inputs: list[str] | list[tuple[str, str]] = list(zip(texts, pairs, strict=True)) if pairs else list(texts)
        tokenizer = self.truncating if options.truncate else self.plain
        # encode_batch_fast skips the character offsets (and so the token strings and word ids, which it leaves
        # wrong): the same ids and type ids for about 17% less tokenizer CPU (32 short texts: 364 -> 304 us).
        encode = (
            tokenizer.encode_batch if options.return_offsets or options.return_tokens else tokenizer.encode_batch_fast
        )
        encodings = encode(inputs, add_special_tokens=options.add_special_tokens)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int32, count=len(encodings))
        if not options.truncate:
            too_long = np.flatnonzero(lengths > self.model.max_length)
            if len(too_long):
                i = int(too_long[0])
                raise errors.invalid_argument(
                    f"input {i} has {int(lengths[i])} tokens, more than the model's limit of {self.model.max_length};"
                    " shorten it or set truncate",
                    f"inputs[{i}]",
                    reason=Reason.INPUT_TOO_LONG,
                )
        cu = np.zeros(len(encodings) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu[1:])
        encoded = Encoded(
            model=self.model.name,
            version=self.model.version,
            # One C-level copy per sequence rather than a Python step per token: this is on every request's path.
            input_ids=np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encodings]),
            token_type_ids=np.concatenate([np.asarray(e.type_ids, dtype=np.int64) for e in encodings]),
            cu_seqlens=cu,
            tokenizer_fingerprint=self.fingerprint,
        )
        if options.return_offsets:
            encoded.offsets = np.array([o for e in encodings for o in e.offsets], dtype=np.int32).reshape(-1, 2)
            encoded.special_tokens_mask = np.fromiter(
                (m for e in encodings for m in e.special_tokens_mask), dtype=np.uint8, count=int(cu[-1])
            )
            encoded.word_ids = np.fromiter(
                (-1 if w is None else w for e in encodings for w in e.word_ids), dtype=np.int32, count=int(cu[-1])
            )
        if options.return_tokens:
            encoded.tokens = [list(e.tokens) for e in encodings]
        return encoded

    def encode_prompt(self, prompt: str, messages: Sequence[ChatMessage]) -> list[int]:
        """A plain prompt with the model's special tokens, or messages rendered with its chat template and generation
        prompt (the template writes its own special tokens, so none are added)."""
        if not messages:
            return list(self.plain.encode(prompt, add_special_tokens=True).ids)
        if not self.model.chat_template:
            raise errors.invalid_argument(
                f"{self.model.name} has no chat template, so it cannot take messages; send a prompt instead",
                "messages",
                reason=Reason.NO_CHAT_TEMPLATE,
            )
        for i, message in enumerate(messages):
            if not message.role:
                raise errors.invalid_argument(f"message {i} has no role", f"messages[{i}].role")
        try:
            text = self.hf.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # the template's own raise_exception (e.g. roles must alternate), or jinja errors
            raise errors.invalid_argument(
                f"the chat template of {self.model.name} refused the messages: {exc}", "messages"
            ) from exc
        return list(self.plain.encode(str(text), add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        bad = [i for i in ids if i < 0 or i >= self.vocab_size]
        if bad:
            raise errors.invalid_argument(
                f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})", "ids"
            )
        return self.plain.decode(list(ids), skip_special_tokens=skip_special_tokens)


class Tokenizer:
    """Tokenizes for every model of the repository, loading each version's tokenizer once."""

    def __init__(self, repository: ModelRepository, max_inputs: int = 2048) -> None:
        self.repository = repository
        self.max_inputs = max_inputs
        self._loaded: dict[tuple[str, str], LoadedTokenizer] = {}
        self._lock = threading.Lock()

    def _get(self, model_ref: str) -> LoadedTokenizer:
        model = self.repository.resolve(model_ref)
        key = (model.name, model.version)
        loaded = self._loaded.get(key)
        if loaded is not None:
            return loaded
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is None:
                try:
                    loaded = LoadedTokenizer(model)
                except (OSError, ValueError) as exc:
                    raise errors.failed_precondition(
                        f"model {model.name}:{model.version} has no usable tokenizer: {exc}",
                        reason=Reason.TOKENIZER_BROKEN,
                        model=model.name,
                    ) from exc
                self._loaded[key] = loaded
        return loaded

    def preload(self) -> None:
        """Loads every model's newest tokenizer so that first requests are not slow; broken models are logged."""
        for name in self.repository.names():
            try:
                self._get(name)
            except errors.TandemError as exc:
                log.error("cannot load tokenizer of %s: %s", name, exc)

    async def tokenize(
        self, model_ref: str, texts: Sequence[str], pairs: Sequence[str], options: TokenizeOptions
    ) -> Encoded:
        if not texts:
            raise errors.invalid_argument("at least one input is required", "inputs")
        if len(texts) > self.max_inputs:
            raise errors.invalid_argument(
                f"{len(texts)} inputs exceed the limit of {self.max_inputs} per request",
                "inputs",
                reason=Reason.TOO_MANY_INPUTS,
            )
        if pairs and len(pairs) != len(texts):
            raise errors.invalid_argument(
                f"{len(pairs)} pair texts for {len(texts)} texts; give one per text or none", "text_pairs"
            )
        chars = sum(len(t) for t in texts) + sum(len(p) for p in pairs)
        if chars <= _INLINE_CHARS and (model := self._loaded_for(model_ref)) is not None:
            return model.encode(texts, pairs, options)
        return await asyncio.to_thread(lambda: self._get(model_ref).encode(texts, pairs, options))

    def _loaded_for(self, model_ref: str) -> LoadedTokenizer | None:
        model = self.repository.resolve(model_ref)
        return self._loaded.get((model.name, model.version))

    async def encode_prompt(self, model_ref: str, prompt: str, messages: Sequence[ChatMessage]) -> Prompt:
        """Token ids of a generation prompt, checked against the model's context (a token must be left to generate)."""
        if bool(prompt) == bool(messages):
            raise errors.invalid_argument("give a prompt or messages, exactly one of them", "prompt")
        loaded = self._loaded_for(model_ref)
        if loaded is None:
            loaded = await asyncio.to_thread(self._get, model_ref)
        model = loaded.model
        if model.task is not Task.TEXT_GENERATION:
            raise errors.invalid_argument(
                f"{model.name} is not a text-generation model (task {model.task.value})",
                "model",
                reason=Reason.WRONG_TASK,
            )
        chars = len(prompt) + sum(len(m.content) for m in messages)
        if chars <= _INLINE_CHARS:
            ids = loaded.encode_prompt(prompt, messages)
        else:
            ids = await asyncio.to_thread(loaded.encode_prompt, prompt, messages)
        if len(ids) >= model.max_length:
            field = "messages" if messages else "prompt"
            raise errors.invalid_argument(
                f"the {field} has {len(ids)} tokens; {model.name} holds {model.max_length} in all, so at most"
                f" {model.max_length - 1} fit before the first generated token",
                field,
                reason=Reason.INPUT_TOO_LONG,
                tokens=str(len(ids)),
            )
        return Prompt(model.name, model.version, ids, loaded.fingerprint, model.max_length)

    async def detokenize(self, model_ref: str, ids: Sequence[int], skip_special_tokens: bool) -> tuple[str, str]:
        loaded = await asyncio.to_thread(self._get, model_ref)
        return loaded.decode(ids, skip_special_tokens), loaded.model.name
