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

- text-generation (Triton's LLM conventions, as its vLLM and TensorRT-LLM backends): in `text_input` BYTES [1], the
  prompt, and optional scalars (any shape of one element) `max_tokens` INT32, `min_tokens` INT32, `temperature` FP32,
  `top_p` FP32, `top_k` INT32, `seed` UINT64, `repetition_penalty` FP32, `ignore_eos` BOOL, `stream` BOOL,
  `exclude_input_in_output` BOOL (accepted; Tandem never returns the prompt), `stop` BYTES [-1] (stop strings) and
  `sampling_parameters` BYTES [1] (a JSON object, as the vLLM backend's); out `text_output` BYTES [1]: the whole
  answer, or in a stream with `stream` true one text delta per response.

Inputs also take the shape [n, 1] ([1, 1] for `query` and `text_input`). Request parameters: `normalize` (bool,
embedding), `truncate` (bool, every task but generation), `top_k` (int, classification), `top_n` (int, rerank),
Triton's `timeout` (int, microseconds: shortens the deadline), and for generation every sampling input above by the
same name (`stop`: one string) and `sampling_parameters` (a JSON string). A generation setting given in several
places is taken from the input tensor first, then the request parameter, then `sampling_parameters`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from services.common import errors
from services.common.errors import Reason
from services.common.references import check_name, check_reference, check_version
from tandem.model.v1 import model_pb2

BYTES, FP32, INT64, INT32, UINT64, BOOL = "BYTES", "FP32", "INT64", "INT32", "UINT64", "BOOL"
TEXT, QUERY = "text", "query"
TEXT_INPUT, TEXT_OUTPUT, STREAM = "text_input", "text_output", "stream"
SAMPLING_PARAMETERS = "sampling_parameters"
INTEGER_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
REAL_TYPES = frozenset({"FP16", "FP32", "FP64"}) | INTEGER_TYPES
# Triton's decoupled convention: every response of a streamed request says whether it is the request's last.
FINAL_RESPONSE = "triton_final_response"
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
    # The elements of a BYTES tensor, row-major; None for other datatypes.
    elements: Sequence[bytes] | None
    # The elements of a BOOL, integer or floating-point tensor, row-major; None for BYTES and unknown datatypes.
    values: Sequence[bool | int | float] | None = None


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
    parameters: Mapping[str, Parameter] = field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    """What the request's parameters ask of the model's task."""

    normalize: bool = True
    truncate: bool = True
    top_k: int = 0
    top_n: int = 0


@dataclass(frozen=True)
class Sampling:
    """A generation request's settings; None (or no stop strings): not given, the model's default."""

    max_tokens: int | None = None
    min_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationCall:
    """A request to a text-generation model, bound: the prompt, whether to stream the answer, the settings."""

    prompt: str
    stream: bool
    sampling: Sampling


_TEXT = TensorSpec(TEXT, BYTES, (-1,))
_QUERY = TensorSpec(QUERY, BYTES, (1,))
_TEXT_INPUT = TensorSpec(TEXT_INPUT, BYTES, (1,))
_GENERATION_INPUTS = (
    _TEXT_INPUT,
    TensorSpec("max_tokens", INT32, (1,)),
    TensorSpec("min_tokens", INT32, (1,)),
    TensorSpec("temperature", FP32, (1,)),
    TensorSpec("top_p", FP32, (1,)),
    TensorSpec("top_k", INT32, (1,)),
    TensorSpec("seed", UINT64, (1,)),
    TensorSpec("repetition_penalty", FP32, (1,)),
    TensorSpec("ignore_eos", BOOL, (1,)),
    TensorSpec("stop", BYTES, (-1,)),
    TensorSpec(STREAM, BOOL, (1,)),
    TensorSpec("exclude_input_in_output", BOOL, (1,)),
    TensorSpec(SAMPLING_PARAMETERS, BYTES, (1,)),
)


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
    if info.task == model_pb2.TASK_TEXT_GENERATION:
        generated = (TensorSpec(TEXT_OUTPUT, BYTES, (1,)),)
        return Signature(info.task, "tandem_text_generation", _GENERATION_INPUTS, generated)
    raise errors.unavailable(f"model {info.name!r} is {NOT_READY_REASON}", model=info.name)


def model_reference(name: str, version: str, name_field: str, version_field: str) -> str:
    """The protocol's (name, version) as Tandem's 'name' or 'name:version'."""
    if not name:
        raise errors.invalid_argument(f"{name_field} is required", name_field)
    if ":" in name:
        hint = f"; give the version in {version_field}" if version_field else ""
        raise errors.invalid_argument(f"model name {name!r} must not contain ':'{hint}", name_field)
    if not version:
        return check_reference(name, name_field)  # a name, or name@alias
    check_name(name, name_field)
    check_version(version, version_field)
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


def _given(call: InferCall, model: str, sig: Signature) -> dict[str, InputTensor]:
    """The request's inputs by name; INVALID_ARGUMENT for one given twice or one the model does not take."""
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
    return given


def bind_inputs(call: InferCall, model: str, sig: Signature, max_inputs: int, max_chars: int) -> dict[str, list[str]]:
    """The texts of each input the model takes; INVALID_ARGUMENT naming the input for anything else."""
    given = _given(call, model, sig)
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


# ----------------------------------------------------------------------------------------------------------------------
# Text generation: the prompt and the settings, from input tensors, request parameters and sampling_parameters

_INT32_MAX = 2**31 - 1
_UINT64_MAX = 2**64 - 1

Setting = bool | int | float | tuple[str, ...]


@dataclass(frozen=True)
class _Kind:
    """What a setting's value must be: `wants` says it in errors; an input tensor has one of `tensor_types` (listed
    in errors as `tensor_names`); `check` returns the value as the setting takes it, or None when it is not one."""

    wants: str
    tensor_types: frozenset[str]
    tensor_names: str
    check: Callable[[object], Setting | None]


def _integer(limit: int) -> Callable[[object], Setting | None]:
    def check(value: object) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            return None
        return value

    return check


def _real(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _bool(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _strings(value: object) -> tuple[str, ...] | None:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


_INTEGERS = "INT8..INT64 or UINT8..UINT64"
_COUNT = _Kind(f"an integer in 0..{_INT32_MAX}", INTEGER_TYPES, _INTEGERS, _integer(_INT32_MAX))
_SEED = _Kind(f"an integer in 0..{_UINT64_MAX}", INTEGER_TYPES, _INTEGERS, _integer(_UINT64_MAX))
_REAL = _Kind("a finite number", REAL_TYPES, f"FP16, FP32, FP64, {_INTEGERS}", _real)
_FLAG = _Kind("a bool", frozenset({BOOL}), BOOL, _bool)
_STOP = _Kind("a string (in sampling_parameters: a list of strings)", frozenset({BYTES}), BYTES, _strings)

# The sampling settings, each also a key of sampling_parameters, named as Triton's vLLM backend names them.
_SAMPLING: dict[str, _Kind] = {
    "max_tokens": _COUNT,
    "min_tokens": _COUNT,
    "temperature": _REAL,
    "top_p": _REAL,
    "top_k": _COUNT,
    "seed": _SEED,
    "repetition_penalty": _REAL,
    "ignore_eos": _FLAG,
    "stop": _STOP,
}


def _utf8(element: bytes, name: str, index: int) -> str:
    try:
        return bytes(element).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.invalid_argument(
            f"input {name!r}: element {index} is not valid UTF-8 ({exc.reason} at byte {exc.start})", f"inputs[{name}]"
        ) from None


def _from_tensor(tensor: InputTensor, kind: _Kind) -> Setting:
    name, field_name = tensor.name, f"inputs[{tensor.name}]"
    if kind is _STOP:
        if tensor.datatype != BYTES or tensor.elements is None:
            raise errors.invalid_argument(
                f"input {name!r} must be {BYTES} (UTF-8 stop strings), got {tensor.datatype or 'no datatype'}",
                field_name,
            )
        return tuple(_utf8(element, name, i) for i, element in enumerate(tensor.elements))
    values = tensor.values
    found = kind.check(values[0]) if tensor.datatype in kind.tensor_types and values and len(values) == 1 else None
    if found is None:
        raise errors.invalid_argument(
            f"input {name!r} must be one element of {kind.tensor_names}, {kind.wants}; got "
            f"{tensor.datatype or 'no datatype'} {list(tensor.shape)}",
            field_name,
        )
    return found


def _from_parameter(name: str, value: Parameter, kind: _Kind) -> Setting:
    found = kind.check(value)
    if found is None:
        raise errors.invalid_argument(f"parameter {name!r} must be {kind.wants}, got {value!r}", f"parameters[{name}]")
    return found


def _json_object(text: str, field_name: str) -> dict[str, object]:
    try:
        decoded = json.loads(text)
    except ValueError as exc:
        raise errors.invalid_argument(f"{SAMPLING_PARAMETERS} is not valid JSON ({exc})", field_name) from None
    if not isinstance(decoded, dict):
        raise errors.invalid_argument(f"{SAMPLING_PARAMETERS} must be a JSON object", field_name)
    for key in decoded:
        if key not in _SAMPLING:
            raise errors.invalid_argument(
                f"{SAMPLING_PARAMETERS}: unknown key {key!r}; Tandem takes {', '.join(_SAMPLING)}", field_name
            )
    return {key: value for key, value in decoded.items() if value is not None}


def _sampling_parameters(
    given: Mapping[str, InputTensor], parameters: Mapping[str, Parameter]
) -> tuple[dict[str, object], str]:
    """The JSON object of the `sampling_parameters` input or else request parameter ({} when neither), and where it
    came from."""
    tensor = given.get(SAMPLING_PARAMETERS)
    if tensor is not None:
        field_name = f"inputs[{SAMPLING_PARAMETERS}]"
        elements = tensor.elements
        if tensor.datatype != BYTES or elements is None or len(elements) != 1:
            raise errors.invalid_argument(
                f"input {SAMPLING_PARAMETERS!r} must be one {BYTES} element (a JSON object), got "
                f"{tensor.datatype or 'no datatype'} {list(tensor.shape)}",
                field_name,
            )
        return _json_object(_utf8(elements[0], SAMPLING_PARAMETERS, 0), field_name), field_name
    field_name = f"parameters[{SAMPLING_PARAMETERS}]"
    value = parameters.get(SAMPLING_PARAMETERS)
    if value is None:
        return {}, field_name
    if not isinstance(value, str):
        raise errors.invalid_argument(
            f"parameter {SAMPLING_PARAMETERS!r} must be a string holding a JSON object (string_param)", field_name
        )
    return _json_object(value, field_name), field_name


def _setting(
    name: str,
    kind: _Kind,
    given: Mapping[str, InputTensor],
    parameters: Mapping[str, Parameter],
    sampling: Mapping[str, object],
    sampling_field: str,
) -> Setting | None:
    """A setting from its input tensor, else its request parameter, else sampling_parameters; None if none has it."""
    tensor = given.get(name)
    if tensor is not None:
        return _from_tensor(tensor, kind)
    parameter = parameters.get(name)
    if parameter is not None:
        return _from_parameter(name, parameter, kind)
    if name not in sampling:
        return None
    found = kind.check(sampling[name])
    if found is None:
        raise errors.invalid_argument(
            f"{SAMPLING_PARAMETERS}: {name!r} must be {kind.wants}, got {json.dumps(sampling[name])}", sampling_field
        )
    return found


def bind_generation(call: InferCall, model: str, sig: Signature, max_chars: int) -> GenerationCall:
    """The prompt, the stream flag and the sampling settings of a request to a text-generation model;
    INVALID_ARGUMENT naming the input or parameter for anything malformed."""
    given = _given(call, model, sig)
    prompt_tensor = given.get(TEXT_INPUT)
    if prompt_tensor is None:
        raise errors.invalid_argument(
            f"missing input {TEXT_INPUT!r}: model {model!r} generates text from a prompt, {TEXT_INPUT} {BYTES} [1]",
            f"inputs[{TEXT_INPUT}]",
        )
    prompt = _texts(prompt_tensor, _TEXT_INPUT, 1, max_chars)[0]
    if not prompt:
        raise errors.invalid_argument(f"input {TEXT_INPUT!r} must not be empty", f"inputs[{TEXT_INPUT}]")
    sampling, sampling_field = _sampling_parameters(given, call.parameters)

    def setting(name: str, kind: _Kind | None = None) -> Setting | None:
        return _setting(name, kind or _SAMPLING[name], given, call.parameters, sampling, sampling_field)

    def integer(name: str) -> int | None:
        value = setting(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def real(name: str) -> float | None:
        value = setting(name)
        return value if isinstance(value, float) else None

    stop, ignore_eos, stream = setting("stop"), setting("ignore_eos"), setting(STREAM, _FLAG)
    # Accepted for Triton clients that send it; Tandem never returns the prompt with the answer.
    setting("exclude_input_in_output", _FLAG)
    return GenerationCall(
        prompt,
        stream=stream is True,
        sampling=Sampling(
            max_tokens=integer("max_tokens"),
            min_tokens=integer("min_tokens"),
            temperature=real("temperature"),
            top_p=real("top_p"),
            top_k=integer("top_k"),
            seed=integer("seed"),
            repetition_penalty=real("repetition_penalty"),
            ignore_eos=ignore_eos if isinstance(ignore_eos, bool) else None,
            stop=stop if isinstance(stop, tuple) else (),
        ),
    )
