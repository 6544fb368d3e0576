"""The gateway's pipeline: for each public call, tokenizer -> inference -> postprocess over the typed stage clients.

Stage tensors pass from one stage to the next as they arrived, never decoded here: the gateway only decodes what
it returns to the caller, which keeps each hop to one serialization.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gateway.clients import InferenceClient, PostprocessStage, TokenizerStage
from gateway.coalescer import Coalescer
from gateway.generation import ChatMessage, GeneratedText, Generation
from gateway.priority import current_priority
from services.common import errors, tensors, timing
from services.common.errors import Reason
from services.common.logging import request_id
from services.common.references import check_reference
from tandem.generation.v1 import generation_pb2
from tandem.inference.v1 import inference_pb2
from tandem.model.v1 import model_pb2
from tandem.postprocess.v1 import postprocess_pb2
from tandem.tokenizer.v1 import tokenizer_pb2

log = logging.getLogger(__name__)

# The request id of the model catalog's background refreshes (ModelCatalog), in the gateway's and the stages' logs.
CATALOG_REQUEST_ID = "model-catalog"

_TASK_NAMES: dict[int, str] = {
    model_pb2.TASK_EMBEDDING: "embedding",
    model_pb2.TASK_CLASSIFICATION: "classification",
    model_pb2.TASK_TOKEN_CLASSIFICATION: "token-classification",
    model_pb2.TASK_RERANK: "rerank",
    model_pb2.TASK_TEXT_GENERATION: "text-generation",
}


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


@dataclass(frozen=True)
class Served:
    """Which model and version answered, and how many tokens it read per input."""

    model: str
    version: str
    token_counts: npt.NDArray[np.int32]

    @property
    def prompt_tokens(self) -> int:
        return int(self.token_counts.sum())

    def part(self, start: int, stop: int) -> Served:
        return Served(self.model, self.version, self.token_counts[start:stop])


def _asked(ref: str) -> None:
    """Notes the model a call asks for (for the access log, which escapes it), then checks it follows the naming rule
    (INVALID_ARGUMENT on `model` before any stage is called)."""
    timing.note(model=ref)
    check_reference(ref)


def _noted(served: Served) -> None:
    """The call's facts for the access log and the per-model metrics: who answered, how many tokens it read."""
    timing.note(served_model=served.model, version=served.version, tokens=served.prompt_tokens)


def _bounds(counts: list[int]) -> list[tuple[int, int]]:
    edges = np.concatenate(([0], np.cumsum(counts))).tolist()
    return list(itertools.pairwise(edges))


@dataclass(frozen=True)
class Embeddings:
    served: Served
    vectors: npt.NDArray[np.float32]

    def split(self, counts: list[int]) -> list[Embeddings]:
        return [Embeddings(self.served.part(a, b), self.vectors[a:b]) for a, b in _bounds(counts)]


@dataclass(frozen=True)
class Classifications:
    served: Served
    results: Sequence[postprocess_pb2.Classification]

    def split(self, counts: list[int]) -> list[Classifications]:
        return [Classifications(self.served.part(a, b), self.results[a:b]) for a, b in _bounds(counts)]


@dataclass(frozen=True)
class TokenClassifications:
    served: Served
    results: Sequence[postprocess_pb2.TokenClassification]

    def split(self, counts: list[int]) -> list[TokenClassifications]:
        return [TokenClassifications(self.served.part(a, b), self.results[a:b]) for a, b in _bounds(counts)]


@dataclass(frozen=True)
class Ranking:
    served: Served
    results: Sequence[postprocess_pb2.RankedDocument]


@dataclass(frozen=True)
class Encodings:
    model: str
    ids: list[npt.NDArray[np.int64]]
    tokens: list[list[str]]
    offsets: list[npt.NDArray[np.int32]]
    special: list[npt.NDArray[np.uint8]]


@dataclass(frozen=True)
class EmbedKey:
    """Requests merge only when everything but their inputs is the same."""

    model: str
    normalize: bool
    truncate: bool
    dimensions: int = 0  # 0: the model's own size
    force_dimensions: bool = False
    prompt_name: str = ""


@dataclass(frozen=True)
class ClassifyKey:
    model: str
    top_k: int
    truncate: bool


def _check_dimensions(info: model_pb2.ModelInfo, dimensions: int, force: bool) -> None:
    """EmbedRequest.dimensions against the model: at most its size, and for a model that declares no Matryoshka
    training only with force_dimensions (its shorter vectors are not what it was trained to give)."""
    if not dimensions:
        return
    if dimensions > info.embedding_dimension:
        raise errors.invalid_argument(
            f"dimensions {dimensions} is larger than model {info.name!r}'s embedding size {info.embedding_dimension}",
            "dimensions",
        )
    if not info.matryoshka_dimensions and not force:
        raise errors.invalid_argument(
            f"model {info.name!r} declares no Matryoshka training (tandem.json matryoshka_dimensions), so its"
            " embeddings cut short may lose much of their quality; set force_dimensions to cut them anyway",
            "dimensions",
        )


def _prompt(info: model_pb2.ModelInfo, name: str) -> str:
    """The text put before every input: the named prompt, or the model's default one when no name is given."""
    if not name:
        return info.prompts.get(info.default_prompt_name, "") if info.default_prompt_name else ""
    if name not in info.prompts:
        known = ", ".join(repr(p) for p in sorted(info.prompts)) or "none"
        raise errors.invalid_argument(
            f"model {info.name!r} has no prompt {name[:64]!r}; its prompts: {known}", "prompt_name"
        )
    return info.prompts[name]


class ModelCatalog:
    """Model descriptions from the inference stage, cached briefly so a request costs no extra hop. Only references
    the stage answered are kept (errors are not cached), and at most `max_entries` of them: callers choose the
    references, so the memory they take must be bounded.

    A reference asked for within the last `keep_warm_s` is read again in the background before its entry expires,
    so a caller who sends a request every few seconds (one search query at a time) never waits for the lookup; an
    entry is never older than `ttl_s`, so a version switch reaches requests as fast as before. A background read
    that fails drops the entry: the next request asks the stage itself and gets its answer."""

    def __init__(
        self, inference: InferenceClient, ttl_s: float, max_entries: int = 1024, keep_warm_s: float = 60.0
    ) -> None:
        self.inference = inference
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.keep_warm_s = keep_warm_s
        # ref -> (expires at, info, last asked for)
        self._cache: dict[str, tuple[float, model_pb2.ModelInfo, float]] = {}
        self._refresher: asyncio.Task[None] | None = None

    async def get(self, ref: str, deadline: float) -> model_pb2.ModelInfo:
        now = time.monotonic()
        hit = self._cache.get(ref)
        if hit is not None and hit[0] > now:
            self._cache[ref] = (hit[0], hit[1], now)
            return hit[1]
        info = (await self.inference.get_model(ref, deadline)).model
        self._store(ref, info, now, now)
        if self._refresher is None and self.keep_warm_s > 0 and self.ttl_s > 0:
            # A context of its own: the task outlives the request that starts it, whose id, priority, trace span
            # and timing record must not follow its calls.
            self._refresher = asyncio.get_running_loop().create_task(
                self._keep_warm(), name=CATALOG_REQUEST_ID, context=contextvars.Context()
            )
        return info

    def _store(self, ref: str, info: model_pb2.ModelInfo, read_at: float, asked_at: float) -> None:
        self._cache.pop(ref, None)
        if len(self._cache) >= self.max_entries:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > read_at}
            while len(self._cache) >= self.max_entries:  # the oldest first (dicts keep insertion order)
                del self._cache[next(iter(self._cache))]
        self._cache[ref] = (read_at + self.ttl_s, info, asked_at)

    async def _keep_warm(self) -> None:
        request_id.set(CATALOG_REQUEST_ID)  # what the stages log its calls under
        interval = self.ttl_s / 2
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            due = [
                ref
                for ref, (expires, _, asked) in list(self._cache.items())
                if now - asked <= self.keep_warm_s and expires - now <= interval
            ]
            for ref in due:
                try:
                    info = (await self.inference.get_model(ref, time.monotonic() + max(interval, 1.0))).model
                except Exception as exc:  # the stage's answer waits for the next request to ask it
                    log.debug("model catalog: reading %s again failed: %s", ref, exc)
                    self._cache.pop(ref, None)
                    continue
                current = self._cache.get(ref)
                if current is not None:  # not evicted meanwhile; keeps when it was last asked for
                    self._store(ref, info, now, current[2])

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher

    async def all(self, deadline: float) -> Sequence[model_pb2.ModelInfo]:
        return list((await self.inference.list_models(deadline)).models)


class Pipeline:
    """Runs each public RPC across the stages; knows no model code."""

    def __init__(
        self,
        tokenizer: TokenizerStage,
        inference: InferenceClient,
        postprocess: PostprocessStage,
        *,
        default_timeout_s: float = 30.0,
        max_inputs: int = 2048,
        max_input_chars: int = 100_000,
        model_cache_ttl_s: float = 1.0,
        coalesce: bool = True,
        coalesce_max_inputs: int = 256,
        coalesce_max_queued: int | None = None,
        coalesce_max_runs: int = 3,
    ) -> None:
        self.tokenizer = tokenizer
        self.inference = inference
        self.postprocess = postprocess
        self.default_timeout_s = default_timeout_s
        self.max_inputs = max_inputs
        self.max_input_chars = max_input_chars
        self.coalesce = coalesce
        self.catalog = ModelCatalog(inference, model_cache_ttl_s)
        self.generation = Generation(
            tokenizer, inference, postprocess, max_messages=max_inputs, max_chars=max_input_chars
        )
        self._embeds: Coalescer[EmbedKey, Embeddings] = Coalescer(
            self._embed_run,
            Embeddings.split,
            max_inputs=coalesce_max_inputs,
            max_queued=coalesce_max_queued,
            max_inflight=coalesce_max_runs,
        )
        self._classifies: Coalescer[ClassifyKey, Classifications] = Coalescer(
            self._classify_run,
            Classifications.split,
            max_inputs=coalesce_max_inputs,
            max_queued=coalesce_max_queued,
            max_inflight=coalesce_max_runs,
        )
        self._token_classifies: Coalescer[ClassifyKey, TokenClassifications] = Coalescer(
            self._classify_tokens_run,
            TokenClassifications.split,
            max_inputs=coalesce_max_inputs,
            max_queued=coalesce_max_queued,
            max_inflight=coalesce_max_runs,
        )

    def deadline(self, time_remaining: float | None) -> float:
        """Absolute monotonic deadline: the caller's, or the default when the caller set none."""
        return time.monotonic() + (self.default_timeout_s if time_remaining is None else time_remaining)

    def _check_inputs(self, inputs: Sequence[str], field: str) -> None:
        timing.note(inputs=len(inputs))
        if not inputs:
            raise errors.invalid_argument(f"at least one entry is required in {field}", field)
        if len(inputs) > self.max_inputs:
            raise errors.invalid_argument(
                f"{len(inputs)} entries in {field} exceed the limit of {self.max_inputs} per request",
                field,
                reason=Reason.TOO_MANY_INPUTS,
            )
        for i, text in enumerate(inputs):
            self.check_length(text, f"{field}[{i}]")

    def check_length(self, text: str, field: str) -> None:
        """INVALID_ARGUMENT naming the field for a text over the character limit (tokenizing it costs before
        truncation can help)."""
        if len(text) > self.max_input_chars:
            raise errors.invalid_argument(
                f"{field} has {len(text)} characters, more than the limit of {self.max_input_chars}",
                field,
                reason=Reason.INPUT_TOO_LONG,
            )

    async def _model_for(self, ref: str, task: int, rpc: str, deadline: float) -> model_pb2.ModelInfo:
        _asked(ref)
        info = await self.catalog.get(ref, deadline)
        if info.task != task:
            raise errors.invalid_argument(
                f"model {info.name!r} is {_a(_TASK_NAMES.get(info.task, 'unknown'))} model; {rpc} needs "
                f"{_a(_TASK_NAMES[task])} model",
                "model",
                reason=Reason.WRONG_TASK,
                model=info.name,
            )
        # A version that is not ready is not refused here: the inference stage that the request reaches answers it
        # (UNAVAILABLE while loading or after a failed load, FAILED_PRECONDITION when unloaded on request), so the
        # answer is the same whether this description was read before a change or after it.
        return info

    async def generate(
        self,
        ref: str,
        prompt: str,
        messages: Sequence[ChatMessage],
        params: generation_pb2.GenerationParams,
        deadline: float,
    ) -> AsyncGenerator[GeneratedText, None]:
        """Text generated by a text-generation model, message by message (see gateway.generation)."""
        info = await self._model_for(ref, model_pb2.TASK_TEXT_GENERATION, "Generate", deadline)
        # Closed with this generator (the caller went away), so its stage calls are cancelled at once, not when the
        # garbage collector gets to it.
        stream = self.generation.generate(info.name, info.version, prompt, messages, params, deadline)
        async with contextlib.aclosing(stream):
            async for message in stream:
                yield message

    async def _tokenize_and_infer(
        self,
        info: model_pb2.ModelInfo,
        texts: Sequence[str],
        truncate: bool,
        deadline: float,
        *,
        pairs: Sequence[str] = (),
        offsets: bool = False,
        pool: bool = False,
    ) -> tuple[tokenizer_pb2.TokenizeResponse, inference_pb2.InferResponse, Served]:
        pinned = f"{info.name}:{info.version}"
        tokenized = await self.tokenizer.tokenize(
            tokenizer_pb2.TokenizeRequest(
                model=pinned, texts=texts, text_pairs=pairs, truncate=truncate, return_offsets=offsets
            ),
            deadline,
        )
        inferred = await self.inference.infer(
            inference_pb2.InferRequest(
                model=pinned,
                batch=tokenized.batch,
                tokenizer_fingerprint=tokenized.tokenizer_fingerprint,
                pool=pool,
                # The call's level (a merged run's callers share one; the coalescer sets it in the run's task).
                priority=inference_pb2.Priority.ValueType(current_priority.get()),
            ),
            deadline,
        )
        cu = tensors.decode(tokenized.batch.cu_seqlens, "cu_seqlens")
        return tokenized, inferred, Served(inferred.model, inferred.version, np.diff(cu).astype(np.int32))

    def _coalescing(self, truncate: bool) -> bool:
        # With truncate=false one caller's too-long input would fail everyone merged with it: run it alone.
        return self.coalesce and truncate

    async def embed(
        self,
        ref: str,
        inputs: Sequence[str],
        normalize: bool,
        truncate: bool,
        deadline: float,
        *,
        dimensions: int | None = None,
        force_dimensions: bool = False,
        prompt_name: str = "",
    ) -> Embeddings:
        _asked(ref)
        self._check_inputs(inputs, "inputs")
        if dimensions is not None and dimensions < 1:
            raise errors.invalid_argument(f"dimensions must be at least 1, got {dimensions}", "dimensions")
        key = EmbedKey(ref, normalize, truncate, dimensions or 0, force_dimensions, prompt_name)
        if self._coalescing(truncate):
            result = await self._embeds.submit(key, inputs, deadline)
        else:
            result = await self._embed_run(key, list(inputs), deadline)
        _noted(result.served)
        return result

    async def _embed_run(self, key: EmbedKey, inputs: list[str], deadline: float) -> Embeddings:
        ref, normalize, truncate = key.model, key.normalize, key.truncate
        info = await self._model_for(ref, model_pb2.TASK_EMBEDDING, "Embed", deadline)
        _check_dimensions(info, key.dimensions, key.force_dimensions)
        prefix = _prompt(info, key.prompt_name)
        texts = [prefix + text for text in inputs] if prefix else inputs
        # Pooled in the inference stage: one row per text crosses the next two hops instead of one per token. An
        # inference stage that predates InferRequest.pool answers token rows (pooled unset), pooled by postprocess.
        tokenized, inferred, served = await self._tokenize_and_infer(info, texts, truncate, deadline, pool=True)
        request = postprocess_pb2.PoolRequest(
            model=served.model,
            version=served.version,
            cu_seqlens=tokenized.batch.cu_seqlens,
            normalize=normalize,
            dimensions=key.dimensions,
        )
        if inferred.pooled:
            request.pooled_embeddings.CopyFrom(inferred.output)
        else:
            request.token_embeddings.CopyFrom(inferred.output)
        pooled = await self.postprocess.pool(request, deadline)
        vectors = tensors.decode_as(pooled.embeddings, "embeddings", np.float32, 2)
        return Embeddings(served, vectors.astype(np.float32, copy=False))

    async def classify(
        self, ref: str, inputs: Sequence[str], top_k: int, truncate: bool, deadline: float
    ) -> Classifications:
        _asked(ref)
        self._check_inputs(inputs, "inputs")
        if top_k < 0:
            raise errors.invalid_argument("top_k must be 0 (every label) or positive", "top_k")
        key = ClassifyKey(ref, top_k, truncate)
        if self._coalescing(truncate):
            classified = await self._classifies.submit(key, inputs, deadline)
        else:
            classified = await self._classify_run(key, list(inputs), deadline)
        _noted(classified.served)
        return classified

    async def _classify_run(self, key: ClassifyKey, inputs: list[str], deadline: float) -> Classifications:
        ref, top_k, truncate = key.model, key.top_k, key.truncate
        info = await self._model_for(ref, model_pb2.TASK_CLASSIFICATION, "Classify", deadline)
        _, inferred, served = await self._tokenize_and_infer(info, inputs, truncate, deadline)
        reply = await self.postprocess.classify(
            postprocess_pb2.ClassifyRequest(
                model=served.model, version=served.version, logits=inferred.output, top_k=top_k
            ),
            deadline,
        )
        return Classifications(served, reply.results)

    async def classify_tokens(
        self, ref: str, inputs: Sequence[str], truncate: bool, deadline: float
    ) -> TokenClassifications:
        _asked(ref)
        self._check_inputs(inputs, "inputs")
        key = ClassifyKey(ref, 0, truncate)
        if self._coalescing(truncate):
            tagged = await self._token_classifies.submit(key, inputs, deadline)
        else:
            tagged = await self._classify_tokens_run(key, list(inputs), deadline)
        _noted(tagged.served)
        return tagged

    async def _classify_tokens_run(self, key: ClassifyKey, inputs: list[str], deadline: float) -> TokenClassifications:
        ref, truncate = key.model, key.truncate
        info = await self._model_for(ref, model_pb2.TASK_TOKEN_CLASSIFICATION, "ClassifyTokens", deadline)
        tokenized, inferred, served = await self._tokenize_and_infer(info, inputs, truncate, deadline, offsets=True)
        reply = await self.postprocess.classify_tokens(
            postprocess_pb2.ClassifyTokensRequest(
                model=served.model,
                version=served.version,
                logits=inferred.output,
                batch=tokenized.batch,
                texts=inputs,
            ),
            deadline,
        )
        return TokenClassifications(served, reply.results)

    async def rerank(
        self, ref: str, query: str, documents: Sequence[str], top_n: int, truncate: bool, deadline: float
    ) -> Ranking:
        _asked(ref)
        self._check_inputs(documents, "documents")
        self.check_length(query, "query")
        if top_n < 0:
            raise errors.invalid_argument("top_n must be 0 (every document) or positive", "top_n")
        info = await self._model_for(ref, model_pb2.TASK_RERANK, "Rerank", deadline)
        _, inferred, served = await self._tokenize_and_infer(
            info, [query] * len(documents), truncate, deadline, pairs=documents
        )
        reply = await self.postprocess.rerank(
            postprocess_pb2.RerankRequest(
                model=served.model, version=served.version, logits=inferred.output, top_n=top_n
            ),
            deadline,
        )
        _noted(served)
        return Ranking(served, reply.results)

    async def tokenize(
        self, ref: str, inputs: Sequence[str], add_special_tokens: bool, truncate: bool, deadline: float
    ) -> Encodings:
        _asked(ref)
        self._check_inputs(inputs, "inputs")
        reply = await self.tokenizer.tokenize(
            tokenizer_pb2.TokenizeRequest(
                model=ref,
                texts=inputs,
                truncate=truncate,
                skip_special_tokens=not add_special_tokens,
                return_offsets=True,
                return_tokens=True,
            ),
            deadline,
        )
        batch = reply.batch
        cu = tensors.decode(batch.cu_seqlens, "cu_seqlens")
        ids = tensors.decode(batch.input_ids, "input_ids")
        offsets = tensors.decode(batch.offsets, "offsets")
        special = tensors.decode(batch.special_tokens_mask, "special_tokens_mask")
        bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True))
        return Encodings(
            model=reply.model,
            ids=[ids[a:b] for a, b in bounds],  # type: ignore[misc]
            tokens=[list(t.tokens) for t in reply.tokens],
            offsets=[offsets[a:b] for a, b in bounds],  # type: ignore[misc]
            special=[special[a:b] for a, b in bounds],  # type: ignore[misc]
        )

    async def detokenize(
        self, ref: str, ids: Sequence[int], skip_special_tokens: bool, deadline: float
    ) -> tokenizer_pb2.DetokenizeResponse:
        _asked(ref)
        return await self.tokenizer.detokenize(
            tokenizer_pb2.DetokenizeRequest(model=ref, ids=ids, skip_special_tokens=skip_special_tokens), deadline
        )

    async def list_models(self, deadline: float) -> Sequence[model_pb2.ModelInfo]:
        return await self.catalog.all(deadline)

    async def get_model(self, ref: str, deadline: float) -> model_pb2.ModelInfo:
        _asked(ref)
        return (await self.inference.get_model(ref, deadline)).model

    async def stages_serving(self, timeout_s: float) -> bool:
        checks = await asyncio.gather(
            self.tokenizer.serving(timeout_s), self.inference.serving(timeout_s), self.postprocess.serving(timeout_s)
        )
        return all(checks)

    async def close(self) -> None:
        await self.catalog.close()
        await asyncio.gather(self._embeds.close(), self._classifies.close(), self._token_classifies.close())
        await asyncio.gather(self.tokenizer.close(), self.inference.close(), self.postprocess.close())
