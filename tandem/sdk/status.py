"""The one decoder of google.rpc.Status: a failed call's code, message and rich details (ErrorInfo, BadRequest,
RetryInfo), for the SDK, the bench, the tests and the gateway passing a stage's error on.

It depends on grpc, grpc_status and the protobuf/google.rpc messages only, so that the services can use it too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = ["FieldViolation", "StatusDetails", "code_of", "decode_rpc_error", "decode_status"]


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field, from google.rpc.BadRequest."""

    field: str
    description: str = ""


@dataclass(frozen=True)
class StatusDetails:
    """What a google.rpc.Status says: None (or empty) for each detail it does not carry."""

    code: grpc.StatusCode
    message: str
    # ErrorInfo
    reason: str | None = None
    domain: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    # BadRequest
    field_violations: tuple[FieldViolation, ...] = ()
    # RetryInfo: how long the server asks the caller to wait before trying again
    retry_delay_s: float | None = None

    @property
    def fields(self) -> list[str]:
        """Names of the bad fields, such as ["inputs"] or ["inputs[1]"]."""
        return [v.field for v in self.field_violations]


def code_of(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a wire code number (UNKNOWN for a number gRPC does not define)."""
    return next((code for code in grpc.StatusCode if code.value[0] == number), grpc.StatusCode.UNKNOWN)


def decode_status(status: status_pb2.Status) -> StatusDetails:
    """The code, message and details of a google.rpc.Status; details of other types are skipped."""
    return _decode(code_of(status.code), status.message, status.details)


def decode_rpc_error(rpc_error: grpc.RpcError) -> StatusDetails:
    """Reads code, message and the `grpc-status-details-bin` trailer of a failed call (blocking or asyncio)."""
    call: grpc.Call = rpc_error  # type: ignore[assignment]  # every RpcError a channel raises is also a Call
    code, message = call.code(), call.details() or ""
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # the trailer disagrees with the status line: trust the status line
        status = None
    # No status means no rich details (a proxy, or gRPC itself, failed the call): code and message only.
    return _decode(code, message, status.details if status is not None else ())


def _decode(code: grpc.StatusCode, message: str, details: Iterable[any_pb2.Any]) -> StatusDetails:
    reason = domain = None
    metadata: dict[str, str] = {}
    violations: tuple[FieldViolation, ...] = ()
    retry_delay_s = None
    for detail in details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = tuple(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay_s = retry.retry_delay.ToNanoseconds() / 1e9
    return StatusDetails(code, message, reason, domain, metadata, violations, retry_delay_s)
