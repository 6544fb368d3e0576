"""The Open Inference Protocol's tensors per task, and how a request binds to them: inputs, outputs, parameters.

Plain Python and numpy types (gateway/oip/converters.py owns the protobuf side; gateway/oip/dataplane.py runs the
bound request through the pipeline).

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

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from services.common import errors
from services.common.errors import Reason
from tandem.model.v1 import model_pb2

BYTES, FP32, INT64 = "BYTES", "FP32", "INT64"
TEXT, QUERY = "text", "query"
NOT_READY_REASON = "not ready: loading, or failed to load (the inference stage's log says why)"

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
class Options:
    """What the request's parameters ask of the model's task."""

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


def request_options(task: int, parameters: Mapping[str, Parameter]) -> Options:
    truncate = _flag(parameters, "truncate", True)
    if task == model_pb2.TASK_EMBEDDING:
        return Options(normalize=_flag(parameters, "normalize", True), truncate=truncate)
    if task == model_pb2.TASK_CLASSIFICATION:
        return Options(truncate=truncate, top_k=_count(parameters, "top_k"))
    if task == model_pb2.TASK_RERANK:
        return Options(truncate=truncate, top_n=_count(parameters, "top_n"))
    return Options(truncate=truncate)


def request_deadline(parameters: Mapping[str, Parameter], deadline: float) -> float:
    """Triton's `timeout` parameter (microseconds) shortens the call's deadline."""
    timeout_us = _count(parameters, "timeout")
    return min(deadline, time.monotonic() + timeout_us / 1e6) if timeout_us else deadline


def check_stateless(parameters: Mapping[str, Parameter]) -> None:
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
            reason=Reason.TOO_MANY_INPUTS,
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
                reason=Reason.INPUT_TOO_LONG,
            )
    return texts


def bind_inputs(call: InferCall, model: str, sig: Signature, max_inputs: int, max_chars: int) -> dict[str, list[str]]:
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


def wanted_outputs(outputs: Sequence[RequestedOutput], model: str, sig: Signature) -> list[str]:
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
