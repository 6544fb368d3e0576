"""The one error table: domain errors carry a gRPC code and a reason, and become a rich google.rpc.Status here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "tandem.dev"

# Reasons: stable, machine-readable identifiers carried in google.rpc.ErrorInfo.reason.
INVALID_INPUT = "INVALID_INPUT"
MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
MODEL_NOT_READY = "MODEL_NOT_READY"
WRONG_TASK = "WRONG_TASK"
INPUT_TOO_LONG = "INPUT_TOO_LONG"
TOO_MANY_INPUTS = "TOO_MANY_INPUTS"
QUEUE_FULL = "QUEUE_FULL"
DEADLINE = "DEADLINE_EXCEEDED"
STAGE_UNAVAILABLE = "STAGE_UNAVAILABLE"
MISSING_CREDENTIALS = "MISSING_CREDENTIALS"
INVALID_API_KEY = "INVALID_API_KEY"
MISSING_SCOPE = "MISSING_SCOPE"
RATE_LIMITED = "RATE_LIMITED"
MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, as in google.rpc.BadRequest."""

    field: str
    description: str


@dataclass
class TandemError(Exception):
    """A failure with a definite gRPC status; raise one of the subclasses."""

    message: str
    reason: str = INTERNAL
    violations: Sequence[FieldViolation] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    retry_after_s: float | None = None
    code: grpc.StatusCode = field(default=grpc.StatusCode.INTERNAL)
    # A status received from another stage, passed on unchanged (code, message and details).
    upstream: status_pb2.Status | None = None

    def __str__(self) -> str:
        return self.message

    def to_status_proto(self) -> status_pb2.Status:
        if self.upstream is not None:
            return self.upstream
        details: list[any_pb2.Any] = []
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=dict(self.metadata))
        details.append(_pack(info))
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            details.append(_pack(bad))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def invalid_argument(message: str, field_name: str, reason: str = INVALID_INPUT, **metadata: str) -> TandemError:
    """Bad input: INVALID_ARGUMENT with a BadRequest detail naming the field."""
    return TandemError(
        message,
        reason=reason,
        violations=(FieldViolation(field_name, message),),
        metadata=metadata,
        code=grpc.StatusCode.INVALID_ARGUMENT,
    )


def not_found(message: str, reason: str = MODEL_NOT_FOUND, **metadata: str) -> TandemError:
    return TandemError(message, reason=reason, metadata=metadata, code=grpc.StatusCode.NOT_FOUND)


def unavailable(
    message: str, reason: str = MODEL_NOT_READY, retry_after_s: float | None = 1.0, **metadata: str
) -> TandemError:
    return TandemError(
        message, reason=reason, metadata=metadata, retry_after_s=retry_after_s, code=grpc.StatusCode.UNAVAILABLE
    )


def resource_exhausted(
    message: str, retry_after_s: float = 0.05, reason: str = QUEUE_FULL, **metadata: str
) -> TandemError:
    return TandemError(
        message,
        reason=reason,
        metadata=metadata,
        retry_after_s=retry_after_s,
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


def deadline_exceeded(message: str, **metadata: str) -> TandemError:
    return TandemError(message, reason=DEADLINE, metadata=metadata, code=grpc.StatusCode.DEADLINE_EXCEEDED)


def failed_precondition(message: str, reason: str, **metadata: str) -> TandemError:
    return TandemError(message, reason=reason, metadata=metadata, code=grpc.StatusCode.FAILED_PRECONDITION)


def unimplemented(message: str, **metadata: str) -> TandemError:
    return TandemError(message, reason="UNSUPPORTED", metadata=metadata, code=grpc.StatusCode.UNIMPLEMENTED)


def unauthenticated(message: str, reason: str = MISSING_CREDENTIALS, **metadata: str) -> TandemError:
    """No credentials, or credentials that match no key: UNAUTHENTICATED, saying which."""
    return TandemError(message, reason=reason, metadata=metadata, code=grpc.StatusCode.UNAUTHENTICATED)


def permission_denied(message: str, reason: str = MISSING_SCOPE, **metadata: str) -> TandemError:
    """A known caller without the scope the call needs: PERMISSION_DENIED."""
    return TandemError(message, reason=reason, metadata=metadata, code=grpc.StatusCode.PERMISSION_DENIED)


def rate_limited(message: str, retry_after_s: float, **metadata: str) -> TandemError:
    """Over the caller's rate: RESOURCE_EXHAUSTED with a RetryInfo saying when the bucket holds enough again."""
    return resource_exhausted(message, retry_after_s=retry_after_s, reason=RATE_LIMITED, **metadata)


def internal() -> TandemError:
    """What the caller sees for an unexpected failure: nothing about its cause (that goes to the log)."""
    return TandemError("internal error", reason=INTERNAL, code=grpc.StatusCode.INTERNAL)


def code_from_number(number: int) -> grpc.StatusCode:
    for status_code in grpc.StatusCode:
        if status_code.value[0] == number:
            return status_code
    return grpc.StatusCode.UNKNOWN


def reason_of(err: BaseException) -> str:
    """The ErrorInfo reason of a domain error, also of one passed on from another stage; "" for anything else."""
    if not isinstance(err, TandemError):
        return ""
    if err.upstream is None:
        return err.reason
    for detail in err.upstream.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def from_upstream(status: status_pb2.Status) -> TandemError:
    """A status received from another stage, kept whole so the gateway passes it on with its code and details."""
    return TandemError(status.message, code=code_from_number(status.code), upstream=status)


__all__ = [
    "DOMAIN",
    "FieldViolation",
    "TandemError",
    "code_pb2",
    "deadline_exceeded",
    "failed_precondition",
    "from_upstream",
    "internal",
    "invalid_argument",
    "not_found",
    "permission_denied",
    "rate_limited",
    "reason_of",
    "resource_exhausted",
    "unauthenticated",
    "unavailable",
]
