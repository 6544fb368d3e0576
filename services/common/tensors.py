"""Tensor codec: numpy arrays <-> tandem.tensor.v1 messages as dtype + shape + raw little-endian bytes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.common import errors
from tandem.tensor.v1 import tensor_pb2

_TO_NUMPY: dict[int, np.dtype[np.generic]] = {
    tensor_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DATA_TYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DATA_TYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DATA_TYPE_UINT8: np.dtype("u1"),
}
_FROM_NUMPY: dict[np.dtype[np.generic], int] = {dtype: code for code, dtype in _TO_NUMPY.items()}
_MAX_DIMS = 8
# Larger than any real tensor dimension; without a bound, a zero-sized tensor could claim a dimension numpy refuses.
_MAX_DIM = 2**31 - 1


def encode(array: npt.NDArray[np.generic]) -> tensor_pb2.Tensor:
    """One copy into the message's bytes; nothing per element."""
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    code = _FROM_NUMPY.get(np.dtype(dtype))
    if code is None:
        raise TypeError(f"no wire type for {array.dtype}")
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return tensor_pb2.Tensor(dtype=code, shape=array.shape, data=data)  # type: ignore[arg-type]


def decode(tensor: tensor_pb2.Tensor, field: str) -> npt.NDArray[np.generic]:
    """A read-only view on the message's bytes; raises INVALID_ARGUMENT naming `field` when inconsistent."""
    dtype = _TO_NUMPY.get(tensor.dtype)
    if dtype is None:
        raise errors.invalid_argument(f"{field}: unsupported dtype {tensor.dtype}", f"{field}.dtype")
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > _MAX_DIMS or any(d < 0 or d > _MAX_DIM for d in shape):
        raise errors.invalid_argument(f"{field}: invalid shape {list(shape)}", f"{field}.shape")
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != len(tensor.data):
        raise errors.invalid_argument(
            f"{field}: {len(tensor.data)} bytes do not hold shape {list(shape)} of {dtype.name}", f"{field}.data"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def decode_as(tensor: tensor_pb2.Tensor, field: str, dtype: npt.DTypeLike, ndim: int) -> npt.NDArray[np.generic]:
    """Decode and check rank; integer/float types are converted to `dtype` when they differ."""
    array = decode(tensor, field)
    if array.ndim != ndim:
        raise errors.invalid_argument(
            f"{field}: expected {ndim} dimensions, got shape {list(array.shape)}", f"{field}.shape"
        )
    wanted = np.dtype(dtype)
    if array.dtype != wanted:
        if array.dtype.kind != wanted.kind and not (array.dtype.kind in "iu" and wanted.kind in "iu"):
            raise errors.invalid_argument(f"{field}: expected {wanted.name}, got {array.dtype.name}", f"{field}.dtype")
        array = array.astype(wanted)
    return array


@dataclass(frozen=True)
class Ragged:
    """Flat per-token rows and the cumulative lengths that split them into sequences."""

    cu_seqlens: npt.NDArray[np.int32]

    @property
    def count(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def total(self) -> int:
        return int(self.cu_seqlens[-1])

    def lengths(self) -> npt.NDArray[np.int32]:
        return np.diff(self.cu_seqlens).astype(np.int32)


def check_cu_seqlens(cu: npt.NDArray[np.generic], total: int, field: str) -> Ragged:
    """Valid cumulative lengths: start at 0, never decrease, end at `total`, at least one sequence."""
    cu32 = cu.astype(np.int32, copy=False)
    if cu32.ndim != 1 or len(cu32) < 2:
        raise errors.invalid_argument(f"{field}: needs at least two entries (one sequence)", field)
    if cu32[0] != 0 or cu32[-1] != total or bool(np.any(np.diff(cu32) < 0)):
        raise errors.invalid_argument(
            f"{field}: must start at 0, never decrease and end at {total} (the token count)", field
        )
    return Ragged(cu32)
