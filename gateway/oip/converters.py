"""Open Inference Protocol messages <-> the data plane's types: all reading and building of inference messages.

Inputs arrive as typed `contents` or as `raw_input_contents` (BYTES raw: per element a 4-byte little-endian length
and the bytes; other datatypes little-endian, row-major); outputs always leave as `raw_output_contents`, which every
client reads (tritonclient's as_numpy) and which costs no per-element protobuf work.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from gateway.oip import dataplane, models, signatures
from gateway.oip.statistics import Duration, VersionStatistics
from services.common import errors
from tandem.oip.v2 import grpc_service_pb2 as pb

_LENGTH = struct.Struct("<I")
_NUMPY: dict[str, np.dtype[np.generic]] = {signatures.FP32: np.dtype("<f4"), signatures.INT64: np.dtype("<i8")}
# Input datatypes other than BYTES: their raw layout, and the field of InferTensorContents that holds them typed
# (FP16 has none: raw only).
_RAW_INPUT: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype("?"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


# ----------------------------------------------------------------------------------------------------------------------
# Requests


def decode_bytes_tensor(raw: bytes, count: int, name: str) -> list[bytes]:
    """The elements of a BYTES tensor in raw form; INVALID_ARGUMENT naming the input when it is malformed."""
    field_name = f"inputs[{name}]"
    elements: list[bytes] = []
    view = memoryview(raw)
    offset, end = 0, len(raw)
    while offset < end:
        if offset + _LENGTH.size > end:
            raise errors.invalid_argument(
                f"input {name!r}: raw BYTES data ends inside the 4-byte length of element {len(elements)}", field_name
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + length > end:
            raise errors.invalid_argument(
                f"input {name!r}: element {len(elements)} claims {length} bytes, but only {end - offset} remain",
                field_name,
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
        if len(elements) > count:
            break
    if len(elements) > count:
        raise errors.invalid_argument(
            f"input {name!r}: raw data holds more than the {count} elements its shape needs", field_name
        )
    if len(elements) < count:
        raise errors.invalid_argument(
            f"input {name!r}: raw data holds {len(elements)} elements, its shape needs {count}", field_name
        )
    return elements


def encode_bytes_tensor(elements: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def _parameter(value: pb.InferParameter, field_name: str) -> signatures.Parameter:
    kind = value.WhichOneof("parameter_choice")
    if kind is None:
        raise errors.invalid_argument(f"{field_name} has no value", field_name)
    result: signatures.Parameter = getattr(value, kind)
    return result


def parameters(entries: Mapping[str, pb.InferParameter], prefix: str = "parameters") -> dict[str, signatures.Parameter]:
    return {key: _parameter(value, f"{prefix}[{key}]") for key, value in entries.items()}


def _values(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, count: int
) -> list[bool | int | float] | None:
    """The elements of a BOOL, integer or floating-point input as Python scalars; None for other datatypes."""
    name, field_name, datatype = tensor.name, f"inputs[{tensor.name}]", tensor.datatype
    dtype = _RAW_INPUT.get(datatype)
    if dtype is None:
        return None
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise errors.invalid_argument(
                f"input {name!r}: raw data holds {len(raw)} bytes, {datatype} {list(tensor.shape)} needs "
                f"{count * dtype.itemsize}",
                field_name,
            )
        values: list[bool | int | float] = np.frombuffer(raw, dtype=dtype).tolist()
        return values
    contents = _CONTENTS.get(datatype)
    values = list(getattr(tensor.contents, contents)) if contents else []
    if len(values) != count:
        where = f"contents.{contents}" if contents else "contents (FP16 is sent raw only)"
        raise errors.invalid_argument(
            f"input {name!r}: {len(values)} elements in {where}, its shape {list(tensor.shape)} needs {count}",
            field_name,
        )
    return values


def _input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> signatures.InputTensor:
    name, field_name = tensor.name, f"inputs[{tensor.name}]"
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise errors.invalid_argument(f"input {name!r}: invalid shape {list(shape)}", field_name)
    count = math.prod(shape)
    if raw is not None and tensor.HasField("contents"):
        raise errors.invalid_argument(
            f"input {name!r}: give its data in contents or in raw_input_contents, not both", field_name
        )
    elements: list[bytes] | None = None
    if tensor.datatype == signatures.BYTES:
        if raw is not None:
            elements = decode_bytes_tensor(raw, count, name)
        else:
            elements = list(tensor.contents.bytes_contents)
            if len(elements) != count:
                raise errors.invalid_argument(
                    f"input {name!r}: {len(elements)} elements in contents.bytes_contents, its shape "
                    f"{list(shape)} needs {count}",
                    field_name,
                )
    return signatures.InputTensor(name, tensor.datatype, shape, elements, _values(tensor, raw, count))


def infer_call(request: pb.ModelInferRequest) -> signatures.InferCall:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise errors.invalid_argument(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: give one per input, in input order",
            "raw_input_contents",
        )
    return signatures.InferCall(
        model_name=request.model_name,
        model_version=request.model_version,
        id=request.id,
        parameters=parameters(request.parameters),
        inputs=[_input(tensor, raw[i] if raw else None) for i, tensor in enumerate(request.inputs)],
        outputs=[
            signatures.RequestedOutput(o.name, parameters(o.parameters, f"outputs[{o.name}].parameters"))
            for o in request.outputs
        ],
    )


def repository_parameters(entries: Mapping[str, pb.ModelRepositoryParameter]) -> dict[str, object]:
    return {
        key: getattr(value, value.WhichOneof("parameter_choice") or "string_param") for key, value in entries.items()
    }


# ----------------------------------------------------------------------------------------------------------------------
# Responses


def _raw(output: signatures.OutputTensor) -> bytes:
    if isinstance(output.data, np.ndarray):
        return bytes(np.ascontiguousarray(output.data, dtype=_NUMPY[output.datatype]).tobytes())
    return encode_bytes_tensor(output.data)


def _infer_parameter(value: signatures.Parameter) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=value)


def infer_response(result: signatures.InferResult) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(
        model_name=result.model_name,
        model_version=result.model_version,
        id=result.id,
        parameters={key: _infer_parameter(value) for key, value in result.parameters.items()},
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name=o.name, datatype=o.datatype, shape=o.shape)
            for o in result.outputs
        ],
        raw_output_contents=[_raw(o) for o in result.outputs],
    )


def stream_response(result: signatures.InferResult) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(infer_response=infer_response(result))


def stream_error(request: pb.ModelInferRequest, err: errors.TandemError) -> pb.ModelStreamInferResponse:
    """A failed request of a stream: its status code and message, and its id so that the client can match it.

    The id is also in the message, since tritonclient hands stream errors to the callback as the message alone.
    """
    about = f" (request id {request.id!r})" if request.id else ""
    return pb.ModelStreamInferResponse(
        error_message=f"{err.code.name}: {err.message}{about}",
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )


def _tensors(specs: Sequence[signatures.TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs]


def model_metadata_response(metadata: dataplane.ModelMetadata) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=metadata.name,
        versions=metadata.versions,
        platform=metadata.platform,
        inputs=_tensors(metadata.inputs),
        outputs=_tensors(metadata.outputs),
    )


def server_metadata_response(metadata: dataplane.ServerMetadata) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=metadata.name, version=metadata.version, extensions=metadata.extensions)


def _duration(value: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=value.count, ns=value.ns)


def model_statistics_response(stats: Sequence[VersionStatistics]) -> pb.ModelStatisticsResponse:
    return pb.ModelStatisticsResponse(
        model_stats=[
            pb.ModelStatistics(
                name=s.name,
                version=s.version,
                last_inference=s.last_inference_ms,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
                inference_stats=pb.InferStatistics(success=_duration(s.success), fail=_duration(s.fail)),
            )
            for s in stats
        ]
    )


def repository_index_response(entries: Sequence[models.IndexEntry]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in entries
        ]
    )
