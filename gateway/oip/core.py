"""The Open Inference Protocol's data plane over the gateway's pipeline: model signatures, inputs, outputs, models.

Plain Python and numpy types in and out (gateway/oip/converters.py owns the protobuf side). Every inference runs
the same Pipeline method as the native API, so both protocols answer alike and their requests coalesce together.

Tensors per task (ModelMetadata reports the same; -1 is a variable dimension):

- embedding: in `text` BYTES [n]; out `embedding` FP32 [n, dim], rows in input order.
- classification: in `text` BYTES [n]; out `scores` FP32 [n, k] and `labels` BYTES [n, k], each row best first
  (k = every label of the model, or top_k).
- token-classification: in `text` BYTES [n]; out `entities` BYTES [n], per input a UTF-8 JSON array of
  {"label", "score", "start", "end", "text"} (offsets in Unicode code points), as the native ClassifyTokens.
- rerank: in `query` BYTES [1] and `text` BYTES [m] (the documents); out `scores` FP32 [m] in document order and
  `ranking` INT64 [k], document indices best first (k = m, or top_n).

Inputs also take the shape [n, 1] ([1, 1] for `query`). Request parameters: `normalize` (bool, embedding),
`truncate` (bool, every task), `top_k` (int, classification), `top_n` (int, rerank), and Triton's `timeout`
(int, microseconds: shortens the deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from gateway.core import Pipeline, Served
from gateway.oip.statistics import InferenceStatistics, VersionStatistics
from services.common import errors
from tandem.model.v1 import model_pb2
from tandem.postprocess.v1 import postprocess_pb2

log = logging.getLogger(__name__)

SERVER_NAME = "tandem"
# Protocol extensions implemented in full. "model_repository" joins once the model registry loads and unloads on
# request; "classification" (Triton's top-k strings) is not offered: `scores` and `labels` with top_k replace it.
EXTENSIONS = ("parameters", "statistics")
# Reason of the errors for what this server does not do (yet).
UNSUPPORTED = "UNSUPPORTED"

BYTES, FP32, INT64 = "BYTES", "FP32", "INT64"
TEXT, QUERY = "text", "query"
READY, UNAVAILABLE = "READY", "UNAVAILABLE"
NOT_READY_REASON = "not ready: loading, or failed to load (the inference stage's log says why)"
MAX_STREAM_IN_FLIGHT = 64

Parameter = bool | int | float | str


@dataclass(frozen=True)
class TensorSpec:
    """A tensor a model takes or returns; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    """A model's task, platform, inputs and outputs, all decided by its task."""

    task: int
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class InputTensor:
    """An input as the request gave it; elements already checked against the shape."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    # The elements of a BYTES tensor, row-major; None for other datatypes, which no Tandem model takes.
    elements: Sequence[bytes] | None


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    parameters: Mapping[str, Parameter] = field(default_factory=dict)


@dataclass(frozen=True)
class InferCall:
    """One inference request: which model, the inputs, the parameters, and the outputs wanted (none: all)."""

    model_name: str
    model_version: str
    id: str
    parameters: Mapping[str, Parameter]
    inputs: Sequence[InputTensor]
    outputs: Sequence[RequestedOutput] = ()


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    # FP32 and INT64: an array of `shape`; BYTES: the elements, row-major.
    data: npt.NDArray[np.generic] | Sequence[bytes]


@dataclass(frozen=True)
class InferResult:
    model_name: str
    model_version: str
    id: str
    outputs: Sequence[OutputTensor]


@dataclass(frozen=True)
class IndexEntry:
    """A model of the repository, described by the version that serves it."""

    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True)
class _Options:
    normalize: bool = True
    truncate: bool = True
    top_k: int = 0
    top_n: int = 0


_TEXT = TensorSpec(TEXT, BYTES, (-1,))
_QUERY = TensorSpec(QUERY, BYTES, (1,))


def signature(info: model_pb2.ModelInfo) -> Signature:
    """The tensors of a model, from its task; a model whose task is unknown (it failed to load) is unavailable."""
    if info.task == model_pb2.TASK_EMBEDDING:
        dim = info.embedding_dimension or -1
        return Signature(info.task, "tandem_embedding", (_TEXT,), (TensorSpec("embedding", FP32, (-1, dim)),))
    if info.task == model_pb2.TASK_CLASSIFICATION:
        labelled = (TensorSpec("scores", FP32, (-1, -1)), TensorSpec("labels", BYTES, (-1, -1)))
        return Signature(info.task, "tandem_classification", (_TEXT,), labelled)
    if info.task == model_pb2.TASK_TOKEN_CLASSIFICATION:
        tagged = (TensorSpec("entities", BYTES, (-1,)),)
        return Signature(info.task, "tandem_token_classification", (_TEXT,), tagged)
    if info.task == model_pb2.TASK_RERANK:
        ranked = (TensorSpec("scores", FP32, (-1,)), TensorSpec("ranking", INT64, (-1,)))
        return Signature(info.task, "tandem_rerank", (_QUERY, _TEXT), ranked)
    raise errors.unavailable(f"model {info.name!r} is {NOT_READY_REASON}", model=info.name)


def model_reference(name: str, version: str, name_field: str, version_field: str) -> str:
    """The protocol's (name, version) as Tandem's 'name' or 'name:version'."""
    if not name:
        raise errors.invalid_argument(f"{name_field} is required", name_field)
    if ":" in name:
        hint = f"; give the version in {version_field}" if version_field else ""
        raise errors.invalid_argument(f"model name {name!r} must not contain ':'{hint}", name_field)
    if not version:
        return name
    if not (version.isascii() and version.isdigit()):
        raise errors.invalid_argument(f"{version_field} must be a number, got {version!r}", version_field)
    return f"{name}:{version}"


def unsupported(message: str) -> errors.TandemError:
    return errors.unimplemented(message)


def server_version() -> str:
    try:
        return importlib.metadata.version("tandem")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


# ----------------------------------------------------------------------------------------------------------------------
# Request parameters


def _flag(parameters: Mapping[str, Parameter], name: str, default: bool) -> bool:
    value = parameters.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise errors.invalid_argument(f"parameter {name!r} must be a bool (bool_param)", f"parameters[{name}]")
    return value


def _count(parameters: Mapping[str, Parameter], name: str) -> int:
    value = parameters.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.invalid_argument(
            f"parameter {name!r} must be an integer >= 0 (int64_param; 0 means all)", f"parameters[{name}]"
        )
    return value


def _options(task: int, parameters: Mapping[str, Parameter]) -> _Options:
    truncate = _flag(parameters, "truncate", True)
    if task == model_pb2.TASK_EMBEDDING:
        return _Options(normalize=_flag(parameters, "normalize", True), truncate=truncate)
    if task == model_pb2.TASK_CLASSIFICATION:
        return _Options(truncate=truncate, top_k=_count(parameters, "top_k"))
    if task == model_pb2.TASK_RERANK:
        return _Options(truncate=truncate, top_n=_count(parameters, "top_n"))
    return _Options(truncate=truncate)


def _request_deadline(parameters: Mapping[str, Parameter], deadline: float) -> float:
    """Triton's `timeout` parameter (microseconds) shortens the call's deadline."""
    timeout_us = _count(parameters, "timeout")
    return min(deadline, time.monotonic() + timeout_us / 1e6) if timeout_us else deadline


def _check_stateless(parameters: Mapping[str, Parameter]) -> None:
    if parameters.get("sequence_id") not in (None, 0, ""):
        raise errors.invalid_argument(
            "Tandem models are stateless: sequence_id is not supported", "parameters[sequence_id]"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and outputs


def _names(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(repr(s.name) for s in specs)


def _texts(tensor: InputTensor, spec: TensorSpec, max_inputs: int, max_chars: int) -> list[str]:
    name, field_name, shape = tensor.name, f"inputs[{tensor.name}]", tensor.shape
    if tensor.datatype != BYTES or tensor.elements is None:
        raise errors.invalid_argument(
            f"input {name!r} must be {BYTES} (UTF-8 texts), got {tensor.datatype or 'no datatype'}", field_name
        )
    fixed = spec.shape[0]
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or (fixed != -1 and shape[0] != fixed):
        want = "[n] or [n, 1]" if fixed == -1 else f"[{fixed}] or [{fixed}, 1]"
        raise errors.invalid_argument(f"input {name!r} must have shape {want}, got {list(shape)}", field_name)
    if shape[0] == 0:
        raise errors.invalid_argument(f"input {name!r} needs at least one text", field_name)
    if shape[0] > max_inputs:
        raise errors.invalid_argument(
            f"{shape[0]} texts in input {name!r} exceed the limit of {max_inputs} per request",
            field_name,
            reason=errors.TOO_MANY_INPUTS,
        )
    texts = []
    for i, element in enumerate(tensor.elements):
        try:
            texts.append(bytes(element).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise errors.invalid_argument(
                f"input {name!r}: element {i} is not valid UTF-8 ({exc.reason} at byte {exc.start})", field_name
            ) from None
        if len(texts[-1]) > max_chars:
            raise errors.invalid_argument(
                f"input {name!r}: element {i} has {len(texts[-1])} characters, more than the limit of {max_chars}",
                f"{field_name}[{i}]",
                reason=errors.INPUT_TOO_LONG,
            )
    return texts


def _bind(call: InferCall, model: str, sig: Signature, max_inputs: int, max_chars: int) -> dict[str, list[str]]:
    """The texts of each input the model takes; INVALID_ARGUMENT naming the input for anything else."""
    given: dict[str, InputTensor] = {}
    for tensor in call.inputs:
        if tensor.name in given:
            raise errors.invalid_argument(f"input {tensor.name!r} is given twice", f"inputs[{tensor.name}]")
        given[tensor.name] = tensor
    expected = {spec.name for spec in sig.inputs}
    for name in given:
        if name not in expected:
            raise errors.invalid_argument(
                f"unexpected input {name!r}: model {model!r} takes {_names(sig.inputs)}", f"inputs[{name}]"
            )
    texts: dict[str, list[str]] = {}
    for spec in sig.inputs:
        found = given.get(spec.name)
        if found is None:
            raise errors.invalid_argument(
                f"missing input {spec.name!r}: model {model!r} takes {_names(sig.inputs)}", f"inputs[{spec.name}]"
            )
        texts[spec.name] = _texts(found, spec, max_inputs, max_chars)
    return texts


def _wanted(outputs: Sequence[RequestedOutput], model: str, sig: Signature) -> list[str]:
    """Names of the outputs to return, in the order asked (every output when none is asked for)."""
    names = [spec.name for spec in sig.outputs]
    if not outputs:
        return names
    wanted: list[str] = []
    for output in outputs:
        field_name = f"outputs[{output.name}]"
        if output.name not in names:
            raise errors.invalid_argument(
                f"unknown output {output.name!r}: model {model!r} returns {_names(sig.outputs)}", field_name
            )
        if "classification" in output.parameters:
            raise errors.invalid_argument(
                "the classification extension is not supported: read the `scores` and `labels` outputs, "
                "limited with the top_k parameter",
                field_name,
            )
        if output.name not in wanted:
            wanted.append(output.name)
    return wanted


def _entities_json(entities: Sequence[postprocess_pb2.Entity]) -> bytes:
    rows = [{"label": e.label, "score": e.score, "start": e.start, "end": e.end, "text": e.text} for e in entities]
    return json.dumps(rows, ensure_ascii=False).encode()


# ----------------------------------------------------------------------------------------------------------------------
# Model lifecycle: what RepositoryModelLoad and RepositoryModelUnload do.


class ModelControl(Protocol):
    """Loads and unloads models on request; the model registry implements this once it exists."""

    async def load(self, name: str, parameters: Mapping[str, object], deadline: float) -> None: ...

    async def unload(self, name: str, parameters: Mapping[str, object], deadline: float) -> None: ...


class StartupModels:
    """Today's lifecycle: the stages load every model of the repository at start, and nothing is unloaded.

    A load of a model in the repository succeeds once that model is ready (waiting for it within the deadline);
    unknown models are NOT_FOUND; overrides (config, files) and unloads are UNIMPLEMENTED until the registry exists.
    """

    def __init__(self, pipeline: Pipeline, poll_s: float = 0.1) -> None:
        self.pipeline = pipeline
        self.poll_s = poll_s

    async def load(self, name: str, parameters: Mapping[str, object], deadline: float) -> None:
        ref = model_reference(name, "", "model_name", "")
        if parameters:
            raise unsupported(
                f"loading with parameters ({', '.join(sorted(parameters))}) is not supported yet: models load "
                "from the model repository as they are"
            )
        while True:
            info = await self.pipeline.get_model(ref, deadline)
            if info.ready:
                return
            if time.monotonic() + self.poll_s >= deadline:
                raise errors.unavailable(f"model {name!r} is {NOT_READY_REASON}", model=name)
            await asyncio.sleep(self.poll_s)

    async def unload(self, name: str, parameters: Mapping[str, object], deadline: float) -> None:
        await self.pipeline.get_model(model_reference(name, "", "model_name", ""), deadline)
        raise unsupported(
            f"unloading models is not supported yet: every model of the repository, {name!r} included, stays "
            "loaded; remove its folder from the repository to stop serving it"
        )


class ModelRegistry(Protocol):
    """The registry operations the protocol needs (gateway.management.client.ManagementClient has them)."""

    async def versions(self, deadline: float) -> Sequence[RegistryVersionLike]: ...

    async def load(self, name: str, deadline: float) -> None: ...

    async def unload(self, name: str, deadline: float) -> None: ...


class RegistryVersionLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def reason(self) -> str: ...


# The registry's states in the protocol's words (Triton's: READY, UNAVAILABLE, LOADING, UNLOADING).
_INDEX_STATE = {"READY": READY, "LOADING": "LOADING", "UNLOADING": "UNLOADING"}


class RegistryModels:
    """Load and unload through the model registry: the inference stage's ManagementService.

    A load brings back what the model's version policy wants and answers once it is ready (a failed load is the
    registry's error, e.g. FAILED_PRECONDITION with the reason); an unload takes every version out of service after
    its in-flight requests, and the model stays unloaded until loaded again. The repository index lists every
    version with its registry state.
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def load(self, name: str, parameters: Mapping[str, object], deadline: float) -> None:
        model_reference(name, "", "model_name", "")
        if parameters:
            raise unsupported(
                f"loading with parameters ({', '.join(sorted(parameters))}) is not supported: models load from the "
                "model repository as they are (add a version with `tandem models add`)"
            )
        await self.registry.load(name, deadline)

    async def unload(self, name: str, parameters: Mapping[str, object], deadline: float) -> None:
        model_reference(name, "", "model_name", "")
        # Tandem models have no dependents (no ensembles), so Triton's unload_dependents changes nothing.
        extra = sorted(set(parameters) - {"unload_dependents"})
        if extra:
            raise unsupported(f"unloading with parameters ({', '.join(extra)}) is not supported")
        await self.registry.unload(name, deadline)

    async def index(self, deadline: float) -> list[IndexEntry]:
        return [
            IndexEntry(v.name, v.version, _INDEX_STATE.get(v.state, UNAVAILABLE), v.reason or v.state.lower())
            if v.state != "READY"
            else IndexEntry(v.name, v.version, READY, "")
            for v in await self.registry.versions(deadline)
        ]


# ----------------------------------------------------------------------------------------------------------------------
# The data plane

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class DataPlane:
    """Answers the protocol's calls with the pipeline, the model lifecycle and the statistics."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        models: ModelControl | None = None,
        registry: ModelRegistry | None = None,
        statistics: InferenceStatistics | None = None,
        max_stream_in_flight: int = MAX_STREAM_IN_FLIGHT,
    ) -> None:
        self.pipeline = pipeline
        self.registry = RegistryModels(registry) if registry is not None else None
        self.models: ModelControl = models or self.registry or StartupModels(pipeline)
        self.statistics = statistics or InferenceStatistics(time.time_ns)
        self.max_stream_in_flight = max_stream_in_flight
        self.metadata = ServerMetadata(SERVER_NAME, server_version(), EXTENSIONS)

    def deadline(self, time_remaining: float | None) -> float:
        return self.pipeline.deadline(time_remaining)

    async def ready(self, deadline: float) -> bool:
        """Ready exactly while every stage answers SERVING."""
        return await self.pipeline.stages_serving(timeout_s=max(0.05, min(deadline - time.monotonic(), 2.0)))

    async def model_ready(self, name: str, version: str, deadline: float) -> bool:
        """False, not an error, for a model that is unknown or unreachable: this is a probe."""
        ref = model_reference(name, version, "name", "version")
        try:
            info = await self.pipeline.get_model(ref, deadline)
        except errors.TandemError as err:
            if err.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                return False
            raise
        return bool(info.ready) and info.task != model_pb2.TASK_UNSPECIFIED

    async def model_metadata(self, name: str, version: str, deadline: float) -> ModelMetadata:
        info = await self.pipeline.get_model(model_reference(name, version, "name", "version"), deadline)
        sig = signature(info)
        return ModelMetadata(info.name, tuple(info.versions), sig.platform, sig.inputs, sig.outputs)

    async def infer(self, call: InferCall, deadline: float) -> InferResult:
        """Runs the pipeline method of the model's task; statistics record the pipeline call."""
        deadline = _request_deadline(call.parameters, deadline)
        _check_stateless(call.parameters)
        ref = model_reference(call.model_name, call.model_version, "model_name", "model_version")
        info = await self.pipeline.catalog.get(ref, deadline)
        sig = signature(info)
        wanted = _wanted(call.outputs, info.name, sig)
        texts = _bind(call, info.name, sig, self.pipeline.max_inputs, self.pipeline.max_input_chars)
        options = _options(sig.task, call.parameters)
        items = len(texts[TEXT])
        started_ms = self.statistics.now_ms()
        started = time.perf_counter_ns()
        try:
            served, outputs = await self._run(sig.task, ref, texts, options, deadline)
        except Exception:
            self.statistics.record_failure(info.name, info.version, time.perf_counter_ns() - started, started_ms)
            raise
        self.statistics.record_success(
            served.model, served.version, items, time.perf_counter_ns() - started, started_ms
        )
        by_name = {output.name: output for output in outputs}
        return InferResult(served.model, served.version, call.id, [by_name[name] for name in wanted])

    async def _run(
        self, task: int, ref: str, texts: dict[str, list[str]], options: _Options, deadline: float
    ) -> tuple[Served, list[OutputTensor]]:
        inputs = texts[TEXT]
        n = len(inputs)
        if task == model_pb2.TASK_EMBEDDING:
            embedded = await self.pipeline.embed(ref, inputs, options.normalize, options.truncate, deadline)
            vectors = embedded.vectors
            return embedded.served, [OutputTensor("embedding", FP32, tuple(vectors.shape), vectors)]
        if task == model_pb2.TASK_CLASSIFICATION:
            classified = await self.pipeline.classify(ref, inputs, options.top_k, options.truncate, deadline)
            k = len(classified.results[0].labels) if classified.results else 0
            if any(len(row.labels) != k for row in classified.results):
                log.error("classification rows of unequal length from %s", ref)
                raise errors.internal()
            scores = np.array([[s.score for s in row.labels] for row in classified.results], dtype=np.float32)
            labels = [s.label.encode() for row in classified.results for s in row.labels]
            return classified.served, [
                OutputTensor("scores", FP32, (n, k), scores.reshape(n, k)),
                OutputTensor("labels", BYTES, (n, k), labels),
            ]
        if task == model_pb2.TASK_TOKEN_CLASSIFICATION:
            tagged = await self.pipeline.classify_tokens(ref, inputs, options.truncate, deadline)
            entities = [_entities_json(row.entities) for row in tagged.results]
            return tagged.served, [OutputTensor("entities", BYTES, (n,), entities)]
        # Rerank: every document is scored (scores in document order); top_n only shortens the ranking.
        ranked = await self.pipeline.rerank(ref, texts[QUERY][0], inputs, 0, options.truncate, deadline)
        scores = np.zeros(n, dtype=np.float32)
        for result in ranked.results:
            scores[result.index] = result.score
        ranking = np.array([r.index for r in ranked.results], dtype=np.int64)
        if options.top_n:
            ranking = ranking[: options.top_n]
        return ranked.served, [
            OutputTensor("scores", FP32, (n,), scores),
            OutputTensor("ranking", INT64, tuple(ranking.shape), ranking),
        ]

    async def model_statistics(self, name: str, version: str, deadline: float) -> list[VersionStatistics]:
        """Every model's serving version (and any other version that answered), or one model's, or one version's."""
        if not name:
            if version:
                raise errors.invalid_argument("a version needs a model name", "name")
            models = await self.pipeline.list_models(deadline)
            keys = {(m.name, m.version) for m in models if m.version} | set(self.statistics.recorded())
        else:
            # The bare name: asking about another version must not make the inference stage load it.
            info = await self.pipeline.get_model(model_reference(name, "", "name", "version"), deadline)
            if version:
                model_reference(name, version, "name", "version")
                if version not in info.versions:
                    raise errors.not_found(f"model {name!r} has no version {version}", model=name, version=version)
                keys = {(info.name, version)}
            else:
                recorded = {key for key in self.statistics.recorded() if key[0] == info.name}
                keys = {(info.name, info.version)} | recorded
        return [self.statistics.get(n, v) for n, v in sorted(keys)]

    async def repository_index(self, ready_only: bool, deadline: float) -> list[IndexEntry]:
        if self.registry is not None:
            listed = await self.registry.index(deadline)
            return [e for e in listed if e.state == READY] if ready_only else listed
        entries = [
            IndexEntry(m.name, m.version, READY, "")
            if m.ready
            else IndexEntry(m.name, m.version, UNAVAILABLE, NOT_READY_REASON)
            for m in await self.pipeline.list_models(deadline)
        ]
        return [e for e in entries if e.state == READY] if ready_only else entries

    async def load(self, name: str, parameters: Mapping[str, object], deadline: float) -> None:
        await self.models.load(name, parameters, deadline)

    async def unload(self, name: str, parameters: Mapping[str, object], deadline: float) -> None:
        await self.models.unload(name, parameters, deadline)


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class _End:
    """The items ran out."""


async def in_completion_order(
    items: AsyncIterator[Item], answer: Callable[[Item], Awaitable[Answer]], limit: int
) -> AsyncIterator[Answer]:
    """Starts `answer` for each item as it arrives, at most `limit` unanswered at a time, and yields the answers
    as they finish. `answer` should not raise: a failure ends the whole sequence.

    Reading stops while `limit` answers are pending, so a client that sends faster than it reads is slowed by gRPC
    flow control instead of filling memory.
    """
    finished: asyncio.Queue[Answer | _Failed | _End] = asyncio.Queue()
    slots = asyncio.Semaphore(limit)
    running: set[asyncio.Task[None]] = set()
    pending = 0

    async def run(item: Item) -> None:
        try:
            finished.put_nowait(await answer(item))
        except Exception as exc:
            finished.put_nowait(_Failed(exc))

    async def read() -> None:
        nonlocal pending
        try:
            async for item in items:
                await slots.acquire()
                pending += 1
                task = asyncio.create_task(run(item))
                running.add(task)
                task.add_done_callback(running.discard)
        except Exception as exc:
            finished.put_nowait(_Failed(exc))
        else:
            finished.put_nowait(_End())

    def on_reader_done(task: asyncio.Task[None]) -> None:
        # A reader cancelled from outside (the call went away) must not leave the answers waiting for it.
        if task.cancelled():
            finished.put_nowait(_Failed(asyncio.CancelledError()))

    reader = asyncio.create_task(read())
    reader.add_done_callback(on_reader_done)
    reading = True
    try:
        while reading or pending:
            done = await finished.get()
            if isinstance(done, _End):
                reading = False
            elif isinstance(done, _Failed):
                raise done.error
            else:
                pending -= 1
                slots.release()
                yield done
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(reader, *running, return_exceptions=True)
