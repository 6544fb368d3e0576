"""Proto <-> domain for the inference stage: the only module here that touches generated messages."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from google.protobuf.message import Message

from services.common import errors, tensors
from services.common.priority import DEFAULT, Priority
from services.common.repository import AccuracyReport, Derivation, ModelVersion, Task, VersionMetadata, VersionPolicy
from services.inference.backends.base import IntArray
from services.inference.core import ModelDescription, TokenInputs
from services.inference.generation.engine import FinishReason, GeneratedTokens
from services.inference.generation.params import RequestedParams
from services.inference.loading import ModelState
from services.inference.management import ModelStatus, VersionStatus
from tandem.generation.v1 import generation_pb2
from tandem.inference.v1 import inference_pb2
from tandem.management.v1 import management_pb2
from tandem.model.v1 import model_pb2
from tandem.tensor.v1 import tensor_pb2

_TASKS: dict[Task, model_pb2.Task.ValueType] = {
    Task.EMBEDDING: model_pb2.TASK_EMBEDDING,
    Task.CLASSIFICATION: model_pb2.TASK_CLASSIFICATION,
    Task.TOKEN_CLASSIFICATION: model_pb2.TASK_TOKEN_CLASSIFICATION,
    Task.RERANK: model_pb2.TASK_RERANK,
    Task.TEXT_GENERATION: model_pb2.TASK_TEXT_GENERATION,
}
_FINISH: dict[FinishReason, generation_pb2.FinishReason.ValueType] = {
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: generation_pb2.FINISH_REASON_STOP_SEQUENCE,
}
_ID_TYPES = (tensor_pb2.DATA_TYPE_INT64, tensor_pb2.DATA_TYPE_INT32)


def _ids(batch: tensor_pb2.TokenBatch, name: str) -> IntArray | None:
    """An INT64 or INT32 id tensor as int64; None when the batch does not carry it."""
    if not batch.HasField(name):  # type: ignore[arg-type]
        return None
    tensor: tensor_pb2.Tensor = getattr(batch, name)
    field = f"batch.{name}"
    if tensor.dtype not in _ID_TYPES:
        raise errors.invalid_argument(f"{field}: expected INT64 or INT32 token ids", f"{field}.dtype")
    return tensors.decode_as(tensor, field, np.int64, 1).astype(np.int64, copy=False)


def priority(request: inference_pb2.InferRequest) -> Priority:
    """InferRequest.priority as a level (the wire numbers are the levels'); unspecified is the default, normal."""
    value = int(request.priority)
    if value == inference_pb2.PRIORITY_UNSPECIFIED:
        return DEFAULT
    if value not in Priority._value2member_map_:
        raise errors.invalid_argument(f"priority {value} is not a known level (1 high, 2 normal, 3 low)", "priority")
    return Priority(value)


def token_inputs(request: inference_pb2.InferRequest) -> TokenInputs:
    """The request's ragged batch; absent tensors become empty arrays, which the core rejects by field."""
    batch = request.batch
    input_ids = _ids(batch, "input_ids")
    cu_seqlens: npt.NDArray[np.int32] = np.zeros(0, dtype=np.int32)
    if batch.HasField("cu_seqlens"):
        cu = tensors.decode_as(batch.cu_seqlens, "batch.cu_seqlens", np.int64, 1)
        if len(cu) and (int(cu.min()) < 0 or int(cu.max()) > np.iinfo(np.int32).max):
            raise errors.invalid_argument("batch.cu_seqlens: values out of range", "batch.cu_seqlens")
        cu_seqlens = cu.astype(np.int32)
    return TokenInputs(
        input_ids=input_ids if input_ids is not None else np.zeros(0, dtype=np.int64),
        token_type_ids=_ids(batch, "token_type_ids"),
        cu_seqlens=cu_seqlens,
    )


def infer_response(
    model: ModelVersion, output: npt.NDArray[np.float32], pooled: bool = False
) -> inference_pb2.InferResponse:
    return inference_pb2.InferResponse(
        model=model.name, version=model.version, output=tensors.encode(output), pooled=pooled
    )


def model_info(description: ModelDescription) -> model_pb2.ModelInfo:
    message = model_pb2.ModelInfo(
        name=description.name,
        task=_TASKS[description.task] if description.task is not None else model_pb2.TASK_UNSPECIFIED,
        versions=description.versions,
        version=description.version,
        max_input_length=description.max_input_length,
        embedding_dimension=description.embedding_dimension,
        labels=description.labels,
        ready=description.ready,
        backend=description.backend,
        multi_label=description.multi_label,
        context_length=description.context_length,
        chat_template=description.chat_template,
        prompts=description.prompts,
        default_prompt_name=description.default_prompt_name,
        matryoshka_dimensions=description.matryoshka_dimensions,
        reason=description.reason,
    )
    if description.provenance is not None:
        message.provenance.CopyFrom(provenance(description.provenance))
    return message


_MODEL_PRECISIONS: dict[str, model_pb2.Precision.ValueType] = {
    "fp32": model_pb2.PRECISION_FP32,
    "fp16": model_pb2.PRECISION_FP16,
    "int8": model_pb2.PRECISION_INT8,
}
_METHODS: dict[str, model_pb2.DerivationMethod.ValueType] = {
    "prune": model_pb2.DERIVATION_METHOD_PRUNE,
    "distill": model_pb2.DERIVATION_METHOD_DISTILL,
}
_ACCURACY_FIGURES = ("min_cosine", "mean_cosine", "top1_agreement", "max_probability_difference")


def provenance(metadata: VersionMetadata) -> model_pb2.Provenance:
    """A version's metadata.json as ModelInfo.provenance: where it came from and, for a derived one, how."""
    message = model_pb2.Provenance(
        source=metadata.source,
        derived_from=metadata.derived_from or "",
        precision=_MODEL_PRECISIONS.get(metadata.precision, model_pb2.PRECISION_UNSPECIFIED),
    )
    if metadata.created is not None:
        message.create_time.FromDatetime(metadata.created)
    if metadata.derivation is not None:
        message.derivation.CopyFrom(_derivation(metadata.derivation))
    if metadata.accuracy is not None:
        report = metadata.accuracy
        message.accuracy.CopyFrom(model_pb2.AccuracyReport(reference=report.reference, texts=report.texts))
        _set_given(message.accuracy, report, _ACCURACY_FIGURES)
    return message


def _derivation(derivation: Derivation) -> model_pb2.Derivation:
    # Settings are numbers, lists and strings of several kinds: each travels as its JSON, so none loses its type.
    message = model_pb2.Derivation(
        method=_METHODS.get(derivation.method, model_pb2.DERIVATION_METHOD_UNSPECIFIED),
        parent=derivation.parent,
        parameters={name: json.dumps(value) for name, value in derivation.parameters.items()},
        corpus=derivation.corpus,
        corpus_sha256=derivation.corpus_sha256,
        corpus_texts=derivation.corpus_texts,
        seconds=derivation.seconds,
    )
    _set_given(message, derivation, ("steps", "parameter_count", "parent_parameter_count"))
    return message


def _set_given(message: Message, source: object, names: Sequence[str]) -> None:
    """Copies the named optional fields that `source` has (not None) onto `message`; the others stay unset."""
    for name in names:
        value = getattr(source, name)
        if value is not None:
            setattr(message, name, value)


def requested_params(params: generation_pb2.GenerationParams) -> RequestedParams:
    """GenerationParams as the core checks them: unset optional fields become None."""
    return RequestedParams(
        max_new_tokens=params.max_new_tokens if params.HasField("max_new_tokens") else None,
        min_new_tokens=params.min_new_tokens,
        temperature=params.temperature if params.HasField("temperature") else None,
        top_p=params.top_p if params.HasField("top_p") else None,
        top_k=params.top_k if params.HasField("top_k") else None,
        repetition_penalty=params.repetition_penalty if params.HasField("repetition_penalty") else None,
        seed=params.seed if params.HasField("seed") else None,
        stop_token_ids=tuple(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
    )


def generate_response(
    model: ModelVersion, prompt_tokens: int, chunk: GeneratedTokens
) -> inference_pb2.GenerateResponse:
    message = inference_pb2.GenerateResponse(
        token_ids=chunk.token_ids,
        prompt_tokens=prompt_tokens,
        generated_tokens=chunk.generated,
        model=model.name,
        version=model.version,
    )
    for step in chunk.logprobs:
        message.logprobs.add(
            token_id=step.token_id,
            logprob=step.logprob,
            top=[generation_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in step.top],
        )
    if chunk.finish is not None:
        message.finish_reason = _FINISH[chunk.finish]
    if chunk.stop_token_id is not None:
        message.stop_token_id = chunk.stop_token_id
    return message


def list_models_response(descriptions: list[ModelDescription]) -> inference_pb2.ListModelsResponse:
    return inference_pb2.ListModelsResponse(models=[model_info(d) for d in descriptions])


def get_model_response(description: ModelDescription) -> inference_pb2.GetModelResponse:
    return inference_pb2.GetModelResponse(model=model_info(description))


# ----------------------------------------------------------------------------------------------------------------------
# tandem.management.v1

_STATES: dict[ModelState, management_pb2.VersionState.ValueType] = {
    ModelState.LOADING: management_pb2.VERSION_STATE_LOADING,
    ModelState.READY: management_pb2.VERSION_STATE_READY,
    ModelState.FAILED: management_pb2.VERSION_STATE_FAILED,
    ModelState.UNLOADING: management_pb2.VERSION_STATE_UNLOADING,
    ModelState.UNLOADED: management_pb2.VERSION_STATE_UNLOADED,
}
_PRECISIONS: dict[str, management_pb2.Precision.ValueType] = {
    "fp32": management_pb2.PRECISION_FP32,
    "fp16": management_pb2.PRECISION_FP16,
    "int8": management_pb2.PRECISION_INT8,
}


def _policy(policy: VersionPolicy) -> management_pb2.VersionPolicy:
    if policy.all:
        return management_pb2.VersionPolicy(all=True)
    if policy.specific is not None:
        return management_pb2.VersionPolicy(specific=[str(v) for v in policy.specific])
    return management_pb2.VersionPolicy(latest=policy.latest or 1)


def _accuracy(report: AccuracyReport) -> management_pb2.AccuracyReport:
    message = management_pb2.AccuracyReport(reference=report.reference, texts=report.texts)
    _set_given(message, report, _ACCURACY_FIGURES)
    return message


def version_status(status: VersionStatus) -> management_pb2.VersionStatus:
    message = management_pb2.VersionStatus(
        version=status.version,
        state=_STATES[status.state],
        reason=status.reason,
        aliases=status.aliases,
        is_default=status.is_default,
        precision=_PRECISIONS.get(status.precision, management_pb2.PRECISION_UNSPECIFIED),
        backend=status.backend,
        tokenizer_fingerprint=status.fingerprint,
        source=status.source,
        in_flight=status.in_flight,
    )
    if status.created is not None:
        message.create_time.FromDatetime(status.created)
    if status.accuracy is not None:
        message.accuracy.CopyFrom(_accuracy(status.accuracy))
    return message


def model_status(status: ModelStatus) -> management_pb2.ModelStatus:
    message = management_pb2.ModelStatus(
        name=status.name,
        task=_TASKS[status.task] if status.task is not None else model_pb2.TASK_UNSPECIFIED,
        versions=[version_status(v) for v in status.versions],
        aliases=status.aliases,
        default_version=status.default_version,
        reason=status.reason,
    )
    if status.policy is not None:
        message.version_policy.CopyFrom(_policy(status.policy))
    return message
