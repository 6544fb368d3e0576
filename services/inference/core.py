"""The inference stage's request path: a ragged token batch is validated, routed to a ready model version, batched
with others, run, and answered; also what ListModels and GetModel tell about each model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from services.common import errors, tensors
from services.common.errors import Reason
from services.common.priority import DEFAULT as DEFAULT_PRIORITY
from services.common.priority import Priority
from services.common.repository import ModelRepository, ModelVersion, Task, VersionMetadata
from services.common.settings import usable_cpus
from services.inference.backends.base import BackendOptions, FloatArray, IntArray
from services.inference.generation.engine import EngineStats, GeneratedTokens
from services.inference.generation.params import RequestedParams, resolve
from services.inference.loading import (
    BackendFactory,
    LoadedModel,
    ModelObserver,
    ModelState,
    backend_label,
    create_backend,
    vocab_size,
)
from services.inference.management import ModelManagement, ModelStatus
from services.inference.registry import ModelRegistry


@dataclass(frozen=True)
class TokenInputs:
    """A ragged batch as the stage receives it: sequence i is input_ids[cu_seqlens[i]:cu_seqlens[i+1]]."""

    input_ids: IntArray
    token_type_ids: IntArray | None
    cu_seqlens: npt.NDArray[np.int32]


@dataclass(frozen=True)
class ModelDescription:
    """What ListModels and GetModel tell about a model and the version that serves it."""

    name: str
    task: Task | None
    versions: tuple[str, ...]
    version: str
    max_input_length: int
    embedding_dimension: int
    labels: tuple[str, ...]
    ready: bool
    backend: str
    multi_label: bool
    # Text-generation models: prompt and generated tokens together, and whether messages can be rendered.
    context_length: int = 0
    chat_template: bool = False
    # Why the model is not ready (loading, or the failure); empty when it is.
    reason: str = ""
    # Embedding models: named prompts, the default one, and the Matryoshka sizes the model declares.
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str = ""
    matryoshka_dimensions: tuple[int, ...] = ()
    # How the version was made (its metadata.json); None for a version folder made by hand.
    provenance: VersionMetadata | None = None


class Inference:
    """The inference stage: a registry of model versions (what is loaded, where a reference goes), the management
    API over it, and the request path: validate a ragged batch, hand it to the batcher of the version that serves
    its reference, and answer with that version's output rows."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        home: Path,
        intra_op_threads: int | None = None,
        device: str | None = None,
        spinning: bool = True,
        instances: int | None = None,
        run_alone: bool | None = None,
        inline_lone_ms: float = 0.0,
        compute_nice: int = 0,
        backend_factory: BackendFactory = create_backend,
        watch_s: float | None = 1.0,
        unload_idle_s: float = 3.0,
        unload_timeout_s: float = 60.0,
        observers: Callable[[str], ModelObserver] | None = None,
    ) -> None:
        self.repository = repository
        self.options = BackendOptions(
            home=home,
            intra_op_threads=intra_op_threads or usable_cpus(),
            device=device,
            spinning=spinning,
            instances=instances,
            run_alone=run_alone,
            inline_lone_ms=inline_lone_ms,
        )
        self.registry = ModelRegistry(
            repository,
            self.options,
            backend_factory=backend_factory,
            compute_nice=compute_nice,
            watch_s=watch_s,
            unload_idle_s=unload_idle_s,
            unload_timeout_s=unload_timeout_s,
            observers=observers,
        )
        self.management = ModelManagement(self.registry)
        # Set when the stage starts shutting down: multiplexed streams then refuse new requests and end (see drain).
        self.draining = asyncio.Event()

    def drain(self) -> None:
        """The stage is shutting down: requests already taken are answered, streams take no new ones."""
        self.draining.set()

    async def start(self) -> None:
        """Loads and warms up what every model's policy wants, then watches the repository (see ModelRegistry)."""
        await self.registry.start()

    async def close(self) -> None:
        """Stops watching, fails what is still queued, frees every backend."""
        await self.registry.close()

    def gauges(self) -> list[tuple[str, str, str, int, int]]:
        """(model, version, state, sequences pending, sequences admitted at most) of every version in the table, for
        the metrics scrape."""
        return self.registry.gauges()

    def generation_gauges(self) -> list[tuple[str, str, EngineStats]]:
        """(model, version, engine stats) of every text-generation version in memory, for the metrics scrape."""
        return self.registry.generation_gauges()

    def loaded(self, model_ref: str) -> LoadedModel:
        """The slot that serves a reference (tests and diagnostics)."""
        return self.registry.loaded(model_ref)

    async def load(self, name: str, version: str = "", wait: bool = False) -> ModelStatus:
        """LoadModel of the management API (see ModelManagement.load), for callers that hold the stage."""
        return await self.management.load(name, version, wait)

    # ------------------------------------------------------------------------------------------------------------------
    # Requests

    async def infer(
        self,
        model_ref: str,
        input_ids: IntArray,
        token_type_ids: IntArray | None,
        cu_seqlens: npt.NDArray[np.int32],
        deadline: float | None,
        tokenizer_fingerprint: str = "",
        pool: bool = False,
        priority: Priority = DEFAULT_PRIORITY,
    ) -> tuple[ModelVersion, FloatArray, bool]:
        """Runs a ragged batch through the model's batcher: [total_tokens, width] or [n, width] float32, and
        whether the rows are pooled ones (pool asked of an embedding model: [n, width]). Higher `priority` is
        served first by the batcher, weighted (services/common/priority.py)."""
        model, slot = self._serving_slot(model_ref, tokenizer_fingerprint)
        if model.task is Task.TEXT_GENERATION:
            raise errors.invalid_argument(
                f"{model.name} is a text-generation model; call Generate", "model", reason=Reason.WRONG_TASK
            )
        self._validate(model, input_ids, token_type_ids, cu_seqlens)
        if not slot.serving or slot.batcher is None:
            raise self._not_serving(model, slot)
        if not slot.batcher.backend.uses_token_type_ids:
            token_type_ids = None
        slot.in_flight += 1
        slot.last_used = time.monotonic()
        try:
            pooled = slot.batcher.pools(pool)
            output = await slot.batcher.submit(
                input_ids, token_type_ids, cu_seqlens, deadline, pool=pooled, priority=priority
            )
        finally:
            slot.in_flight -= 1
        return model, output, pooled

    def _serving_slot(self, model_ref: str, tokenizer_fingerprint: str) -> tuple[ModelVersion, LoadedModel]:
        """The version a reference routes to and its slot; refuses ids made by another tokenizer."""
        model, slot = self.registry.select(model_ref)
        if slot is None:
            raise self.registry.not_loaded(model)
        if tokenizer_fingerprint and slot.fingerprint and tokenizer_fingerprint != slot.fingerprint:
            raise errors.failed_precondition(
                f"the token ids were made by another tokenizer ({tokenizer_fingerprint}) than {model.ref}'s"
                f" ({slot.fingerprint}); the tokenizer and inference stages read different files for this version",
                reason=Reason.TOKENIZER_MISMATCH,
                model=model.name,
                version=model.version,
                expected=slot.fingerprint,
                got=tokenizer_fingerprint,
            )
        return model, slot

    @staticmethod
    def _not_serving(model: ModelVersion, slot: LoadedModel) -> errors.TandemError:
        detail = f": {slot.reason}" if slot.reason else ""
        state = "unloading" if slot.refusing else slot.state
        return errors.unavailable(f"model {model.ref} is {state}{detail}", model=model.name, version=model.version)

    async def generate(
        self,
        model_ref: str,
        prompt_ids: Sequence[int],
        requested: RequestedParams,
        deadline: float | None,
        tokenizer_fingerprint: str = "",
    ) -> tuple[ModelVersion, AsyncGenerator[GeneratedTokens, None]]:
        """Checks a generation request and admits its sequence; the tokens then stream from the iterator. Errors
        found before the first token (bad parameters, no KV capacity) are raised here, not from the iterator."""
        model, slot = self._serving_slot(model_ref, tokenizer_fingerprint)
        if model.task is not Task.TEXT_GENERATION:
            raise errors.invalid_argument(
                f"{model.name} is {'an' if model.task.value[0] in 'aeiou' else 'a'} {model.task.value} model, not a"
                " text-generation model",
                "model",
                reason=Reason.WRONG_TASK,
            )
        if not prompt_ids:
            raise errors.invalid_argument("the prompt holds no tokens", "prompt_ids")
        engine = slot.engine
        if not slot.serving or engine is None:
            raise self._not_serving(model, slot)
        low, high = min(prompt_ids), max(prompt_ids)
        if low < 0 or high >= engine.vocab:
            bad = low if low < 0 else high
            raise errors.invalid_argument(
                f"token id {bad} is outside the vocabulary of {model.name} (0..{engine.vocab - 1})", "prompt_ids"
            )
        params = resolve(
            requested, len(prompt_ids), model.max_length, engine.default_max_new_tokens, engine.vocab, engine.defaults
        )
        slot.in_flight += 1
        slot.last_used = time.monotonic()
        try:
            stream = engine.generate(prompt_ids, params, deadline)
            # The first step admits the sequence (or raises RESOURCE_EXHAUSTED) before the caller sees a stream.
            first = await anext(stream)
        except BaseException:
            slot.in_flight -= 1
            await stream.aclose()
            raise
        return model, self._counted(slot, first, stream)

    @staticmethod
    async def _counted(
        slot: LoadedModel, first: GeneratedTokens, stream: AsyncGenerator[GeneratedTokens, None]
    ) -> AsyncGenerator[GeneratedTokens, None]:
        """The stream, holding the version in memory (in_flight) until it ends or its reader goes away."""
        try:
            yield first
            if first.finish is None:
                async for chunk in stream:
                    slot.last_used = time.monotonic()
                    yield chunk
        finally:
            slot.in_flight -= 1
            await stream.aclose()

    def _validate(
        self,
        model: ModelVersion,
        input_ids: IntArray,
        token_type_ids: IntArray | None,
        cu_seqlens: npt.NDArray[np.int32],
    ) -> None:
        if input_ids.ndim != 1:
            raise errors.invalid_argument("input_ids must be flat: [total_tokens]", "batch.input_ids")
        if len(cu_seqlens) < 2 and len(input_ids) == 0:
            raise errors.invalid_argument("the batch holds no sequences", "batch")
        ragged = tensors.check_cu_seqlens(cu_seqlens, len(input_ids), "batch.cu_seqlens")
        if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
            raise errors.invalid_argument(
                f"{len(token_type_ids)} token_type_ids for {len(input_ids)} input_ids; give one per token or none",
                "batch.token_type_ids",
            )
        if ragged.count > model.config.max_queue_size:
            raise errors.invalid_argument(
                f"{ragged.count} sequences exceed the limit of {model.config.max_queue_size} per request",
                "batch.cu_seqlens",
                reason=Reason.TOO_MANY_INPUTS,
            )
        lengths = ragged.lengths()
        empty = np.flatnonzero(lengths == 0)
        if len(empty):
            i = int(empty[0])
            raise errors.invalid_argument(f"sequence {i} is empty", "batch.cu_seqlens", sequence=str(i))
        too_long = np.flatnonzero(lengths > model.max_length)
        if len(too_long):
            i = int(too_long[0])
            raise errors.invalid_argument(
                f"sequence {i} has {int(lengths[i])} tokens, more than the limit of {model.max_length} of {model.name}",
                "batch.cu_seqlens",
                reason=Reason.INPUT_TOO_LONG,
                sequence=str(i),
            )
        vocab = vocab_size(model, 0)
        if vocab and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            bad = int(input_ids[(input_ids < 0) | (input_ids >= vocab)][0])
            raise errors.invalid_argument(
                f"token id {bad} is outside the vocabulary of {model.name} (0..{vocab - 1})", "batch.input_ids"
            )
        segments = model.hf_config.get("type_vocab_size")
        if (
            token_type_ids is not None
            and isinstance(segments, int)
            and segments > 0
            and len(token_type_ids)
            and (int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= segments)
        ):
            raise errors.invalid_argument(
                f"token_type_ids must lie in 0..{segments - 1} for {model.name}", "batch.token_type_ids"
            )

    # ------------------------------------------------------------------------------------------------------------------
    # What ListModels and GetModel tell

    def models(self) -> list[ModelDescription]:
        """Every model of the repository, sorted by name, described by the version that serves it."""
        out: list[ModelDescription] = []
        for name in self.repository.names():
            try:
                versions = tuple(self.repository.versions(name))
                model, slot = self.registry.select(name)
            except errors.TandemError as exc:
                out.append(self._describe_broken(name, str(exc)))
                continue
            out.append(self._describe(model, slot, versions))
        return out

    def model(self, model_ref: str) -> ModelDescription:
        """One model, described by the version the reference names (or the one serving a bare name or alias)."""
        model, slot = self.registry.select(model_ref)
        return self._describe(model, slot, tuple(self.repository.versions(model.name)))

    def _describe(self, model: ModelVersion, slot: LoadedModel | None, versions: tuple[str, ...]) -> ModelDescription:
        ready = slot is not None and slot.state is ModelState.READY
        reason = ""
        if slot is None:
            reason = str(self.registry.not_loaded(model))
        elif not ready:
            reason = slot.reason or str(slot.state)
        return ModelDescription(
            name=model.name,
            task=model.task,
            versions=versions,
            version=model.version,
            # A prompt must leave room for one generated token.
            max_input_length=model.max_length - 1 if model.task is Task.TEXT_GENERATION else model.max_length,
            embedding_dimension=model.hidden_size if model.task is Task.EMBEDDING else 0,
            labels=model.labels if model.task not in (Task.EMBEDDING, Task.TEXT_GENERATION) else (),
            ready=ready,
            backend=slot.backend.name if slot is not None and slot.backend else backend_label(model.config),
            multi_label=model.multi_label,
            context_length=model.max_length if model.task is Task.TEXT_GENERATION else 0,
            chat_template=model.chat_template,
            reason=reason,
            prompts=model.prompts,
            default_prompt_name=model.default_prompt_name,
            matryoshka_dimensions=tuple(model.config.matryoshka_dimensions or ()),
            provenance=model.metadata,
        )

    @staticmethod
    def _describe_broken(name: str, reason: str, versions: tuple[str, ...] = ()) -> ModelDescription:
        return ModelDescription(
            name=name,
            task=None,
            versions=versions,
            version=versions[-1] if versions else "",
            max_input_length=0,
            embedding_dimension=0,
            labels=(),
            ready=False,
            backend="",
            multi_label=False,
            reason=reason,
        )
