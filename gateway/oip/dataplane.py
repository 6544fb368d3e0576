"""The Open Inference Protocol's data plane over the gateway's pipeline: health, metadata, inference, statistics.

Every inference runs the same Pipeline method as the native API, so both protocols answer alike and their requests
coalesce together. The tensors of each task and the binding of a request to them are in gateway/oip/signatures.py;
the model repository extension (load, unload, index) in gateway/oip/models.py.

Text generation follows Triton's decoupled models: in a stream, a request with `stream` true is answered with one
response per text delta (none for ids the detokenizer holds back), each with the parameter `triton_final_response`,
true on the last, which also carries `finish_reason`, `prompt_tokens` and `generated_tokens` (and `stop_sequence`) and
may have empty text; anywhere else the answer is one response with the whole text and the same parameters.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from gateway.core import Pipeline, Served
from gateway.generation import GeneratedText
from gateway.oip.models import IndexEntry, ModelRegistry, RegistryModels
from gateway.oip.signatures import (
    BYTES,
    FINAL_RESPONSE,
    FP32,
    INT64,
    QUERY,
    TEXT,
    TEXT_OUTPUT,
    GenerationCall,
    InferCall,
    InferResult,
    Options,
    OutputTensor,
    Parameter,
    Signature,
    TensorSpec,
    bind_generation,
    bind_inputs,
    check_stateless,
    model_reference,
    request_deadline,
    request_options,
    signature,
    wanted_outputs,
)
from gateway.oip.statistics import InferenceStatistics, VersionStatistics
from gateway.priority import from_oip_parameters
from services.common import errors
from tandem.generation.v1 import generation_pb2
from tandem.model.v1 import model_pb2
from tandem.postprocess.v1 import postprocess_pb2

log = logging.getLogger(__name__)

SERVER_NAME = "tandem"
# Protocol extensions implemented in full. "model_repository" joins once the model registry loads and unloads on
# request; "classification" (Triton's top-k strings) is not offered: `scores` and `labels` with top_k replace it.
EXTENSIONS = ("parameters", "statistics")
MAX_STREAM_IN_FLIGHT = 64


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


def server_version() -> str:
    try:
        return importlib.metadata.version("tandem")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class _Bound:
    """A request checked against its model: the deadline, the pinned reference, the model, its tensors, the outputs
    wanted."""

    deadline: float
    ref: str
    info: model_pb2.ModelInfo
    sig: Signature
    wanted: list[str]


def _entities_json(entities: Sequence[postprocess_pb2.Entity]) -> bytes:
    rows = [{"label": e.label, "score": e.score, "start": e.start, "end": e.end, "text": e.text} for e in entities]
    return json.dumps(rows, ensure_ascii=False).encode()


_FINISH_REASONS = {
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}


def generation_params(call: GenerationCall) -> generation_pb2.GenerationParams:
    """The pipeline's parameters; a setting the request left out stays unset (the model's default)."""
    sampling = call.sampling
    params = generation_pb2.GenerationParams(stop=sampling.stop)
    if sampling.max_tokens is not None:
        params.max_new_tokens = sampling.max_tokens
    if sampling.min_tokens is not None:
        params.min_new_tokens = sampling.min_tokens
    if sampling.temperature is not None:
        params.temperature = sampling.temperature
    if sampling.top_p is not None:
        params.top_p = sampling.top_p
    if sampling.top_k is not None:
        params.top_k = sampling.top_k
    if sampling.seed is not None:
        params.seed = sampling.seed
    if sampling.repetition_penalty is not None:
        params.repetition_penalty = sampling.repetition_penalty
    if sampling.ignore_eos is not None:
        params.ignore_eos = sampling.ignore_eos
    return params


def _summary(last: GeneratedText) -> dict[str, Parameter]:
    """The response parameters that end an answer: why it ended and the tokens used."""
    summary: dict[str, Parameter] = {
        "finish_reason": _FINISH_REASONS.get(last.finish_reason, "unknown"),
        "prompt_tokens": last.prompt_tokens,
        "generated_tokens": last.generated_tokens,
    }
    if last.stop_sequence:
        summary["stop_sequence"] = last.stop_sequence
    return summary


async def _close(stream: AsyncIterator[GeneratedText]) -> None:
    """Closes the pipeline's generation now, which cancels its stage calls, rather than when it is collected."""
    if isinstance(stream, AsyncGenerator):
        await stream.aclose()


class DataPlane:
    """Answers the protocol's calls with the pipeline, the model registry and the statistics."""

    def __init__(
        self,
        pipeline: Pipeline,
        registry: ModelRegistry,
        *,
        statistics: InferenceStatistics | None = None,
        max_stream_in_flight: int = MAX_STREAM_IN_FLIGHT,
    ) -> None:
        self.pipeline = pipeline
        self.models = RegistryModels(registry)
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

    async def _bind(self, call: InferCall, deadline: float) -> _Bound:
        deadline = request_deadline(call.parameters, deadline)
        check_stateless(call.parameters)
        from_oip_parameters(call.parameters)  # Triton's `priority`: 1 high, 2 normal, 3 low, 0 the key's default
        ref = model_reference(call.model_name, call.model_version, "model_name", "model_version")
        info = await self.pipeline.catalog.get(ref, deadline)
        sig = signature(info)
        return _Bound(deadline, ref, info, sig, wanted_outputs(call.outputs, info.name, sig))

    async def infer(self, call: InferCall, deadline: float) -> InferResult:
        """Runs the pipeline method of the model's task; statistics record the pipeline call. A text-generation
        model answers with the whole text, whatever `stream` says."""
        bound = await self._bind(call, deadline)
        if bound.sig.task != model_pb2.TASK_TEXT_GENERATION:
            return await self._infer(bound, call)
        request = bind_generation(call, bound.info.name, bound.sig, self.pipeline.max_input_chars)
        (whole,) = [result async for result in self._generate(bound, call.id, request, streamed=False)]
        return whole

    async def infer_stream(self, call: InferCall, deadline: float) -> AsyncGenerator[InferResult, None]:
        """A request of ModelStreamInfer: one result, or with a text-generation model and `stream` true one per text
        delta. Closing it cancels the generation."""
        bound = await self._bind(call, deadline)
        if bound.sig.task != model_pb2.TASK_TEXT_GENERATION:
            yield await self._infer(bound, call)
            return
        request = bind_generation(call, bound.info.name, bound.sig, self.pipeline.max_input_chars)
        async with contextlib.aclosing(self._generate(bound, call.id, request, streamed=True)) as answers:
            async for result in answers:
                yield result

    async def _infer(self, bound: _Bound, call: InferCall) -> InferResult:
        info, sig = bound.info, bound.sig
        texts = bind_inputs(call, info.name, sig, self.pipeline.max_inputs, self.pipeline.max_input_chars)
        options = request_options(sig.task, call.parameters)
        items = len(texts[TEXT])
        started_ms = self.statistics.now_ms()
        started = time.perf_counter_ns()
        try:
            served, outputs = await self._run(sig.task, bound.ref, texts, options, bound.deadline)
        except Exception:
            self.statistics.record_failure(info.name, info.version, time.perf_counter_ns() - started, started_ms)
            raise
        self.statistics.record_success(
            served.model, served.version, items, time.perf_counter_ns() - started, started_ms
        )
        by_name = {output.name: output for output in outputs}
        return InferResult(served.model, served.version, call.id, [by_name[name] for name in bound.wanted])

    async def _generate(
        self, bound: _Bound, request_id: str, request: GenerationCall, *, streamed: bool
    ) -> AsyncGenerator[InferResult, None]:
        """The answer of a text-generation model: one result per text delta when `streamed` and the request asks to
        stream, otherwise one with the whole text. `streamed` results carry `triton_final_response`."""
        info = bound.info
        started_ms = self.statistics.now_ms()
        started = time.perf_counter_ns()
        deltas = streamed and request.stream
        stream = self.pipeline.generate(bound.ref, request.prompt, (), generation_params(request), bound.deadline)
        texts: list[str] = []
        last: GeneratedText | None = None
        try:
            async for message in stream:
                last = message
                if not deltas:
                    texts.append(message.text)
                    continue
                final = message.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
                if not (final or message.text):
                    continue  # ids held back mid-character or mid-stop-string: nothing to say yet
                parameters: dict[str, Parameter] = {FINAL_RESPONSE: final, **(_summary(message) if final else {})}
                yield self._text_result(message, request_id, message.text, parameters)
        except Exception:
            self.statistics.record_failure(info.name, info.version, time.perf_counter_ns() - started, started_ms)
            raise
        finally:
            await _close(stream)
        if last is None:
            log.error("a generation of %s ended without a message", bound.ref)
            raise errors.internal()
        self.statistics.record_success(last.model, last.version, 1, time.perf_counter_ns() - started, started_ms)
        if not deltas:
            parameters = {FINAL_RESPONSE: True} if streamed else {}
            yield self._text_result(last, request_id, "".join(texts), {**parameters, **_summary(last)})

    @staticmethod
    def _text_result(
        message: GeneratedText, request_id: str, text: str, parameters: dict[str, Parameter]
    ) -> InferResult:
        output = OutputTensor(TEXT_OUTPUT, BYTES, (1,), [text.encode()])
        return InferResult(message.model, message.version, request_id, [output], parameters)

    async def _run(
        self, task: int, ref: str, texts: dict[str, list[str]], options: Options, deadline: float
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
        return await self.models.index(ready_only, deadline)

    async def load(self, name: str, parameters: Mapping[str, object], deadline: float) -> None:
        await self.models.load(name, parameters, deadline)

    async def unload(self, name: str, parameters: Mapping[str, object], deadline: float) -> None:
        await self.models.unload(name, parameters, deadline)
