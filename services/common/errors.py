"""The one error table: domain errors carry a gRPC code and a reason, and become a rich google.rpc.Status here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tandem.sdk.status import decode_status

DOMAIN = "tandem.dev"


class Reason(StrEnum):
    """Why a call failed: a stable, machine-readable identifier sent in google.rpc.ErrorInfo.reason (the member's
    value is the wire string), with the status code it goes with. Every reason a stage sends is one of these."""

    code: grpc.StatusCode

    def __new__(cls, value: str, code: grpc.StatusCode) -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.code = code
        return member

    # The request itself
    INVALID_INPUT = "INVALID_INPUT", grpc.StatusCode.INVALID_ARGUMENT
    WRONG_TASK = "WRONG_TASK", grpc.StatusCode.INVALID_ARGUMENT
    INPUT_TOO_LONG = "INPUT_TOO_LONG", grpc.StatusCode.INVALID_ARGUMENT
    TOO_MANY_INPUTS = "TOO_MANY_INPUTS", grpc.StatusCode.INVALID_ARGUMENT
    NO_CHAT_TEMPLATE = "NO_CHAT_TEMPLATE", grpc.StatusCode.INVALID_ARGUMENT
    UNSUPPORTED = "UNSUPPORTED", grpc.StatusCode.UNIMPLEMENTED
    # The model it names
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND", grpc.StatusCode.NOT_FOUND
    MODEL_NOT_READY = "MODEL_NOT_READY", grpc.StatusCode.UNAVAILABLE
    MODEL_NOT_LOADED = "MODEL_NOT_LOADED", grpc.StatusCode.FAILED_PRECONDITION
    MODEL_BROKEN = "MODEL_BROKEN", grpc.StatusCode.FAILED_PRECONDITION
    MODEL_CONFIG_INVALID = "MODEL_CONFIG_INVALID", grpc.StatusCode.FAILED_PRECONDITION
    TOKENIZER_MISMATCH = "TOKENIZER_MISMATCH", grpc.StatusCode.FAILED_PRECONDITION
    TOKENIZER_BROKEN = "TOKENIZER_BROKEN", grpc.StatusCode.FAILED_PRECONDITION
    REPOSITORY_NOT_WRITABLE = "REPOSITORY_NOT_WRITABLE", grpc.StatusCode.FAILED_PRECONDITION
    # Capacity and the path between stages
    QUEUE_FULL = "QUEUE_FULL", grpc.StatusCode.RESOURCE_EXHAUSTED
    RATE_LIMITED = "RATE_LIMITED", grpc.StatusCode.RESOURCE_EXHAUSTED
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE", grpc.StatusCode.RESOURCE_EXHAUSTED
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED", grpc.StatusCode.DEADLINE_EXCEEDED
    STAGE_UNAVAILABLE = "STAGE_UNAVAILABLE", grpc.StatusCode.UNAVAILABLE
    # The caller
    MISSING_CREDENTIALS = "MISSING_CREDENTIALS", grpc.StatusCode.UNAUTHENTICATED
    INVALID_API_KEY = "INVALID_API_KEY", grpc.StatusCode.UNAUTHENTICATED
    MISSING_SCOPE = "MISSING_SCOPE", grpc.StatusCode.PERMISSION_DENIED
    # Anything unexpected (the cause goes to the log, not to the caller)
    INTERNAL = "INTERNAL", grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, as in google.rpc.BadRequest."""

    field: str
    description: str


@dataclass
class TandemError(Exception):
    """A failure with a definite gRPC status; raise one of the subclasses."""

    message: str
    reason: str = Reason.INTERNAL
    violations: Sequence[FieldViolation] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    retry_after_s: float | None = None
    code: grpc.StatusCode = field(default=Reason.INTERNAL.code)
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


def invalid_argument(
    message: str, field_name: str, reason: Reason = Reason.INVALID_INPUT, **metadata: str
) -> TandemError:
    """Bad input: INVALID_ARGUMENT with a BadRequest detail naming the field."""
    return TandemError(
        message,
        reason=reason,
        violations=(FieldViolation(field_name, message),),
        metadata=metadata,
        code=grpc.StatusCode.INVALID_ARGUMENT,
    )


def not_found(message: str, reason: Reason = Reason.MODEL_NOT_FOUND, **metadata: str) -> TandemError:
    return TandemError(message, reason=reason, metadata=metadata, code=grpc.StatusCode.NOT_FOUND)


def unavailable(
    message: str, reason: Reason = Reason.MODEL_NOT_READY, retry_after_s: float | None = 1.0, **metadata: str
) -> TandemError:
    return TandemError(
        message, reason=reason, metadata=metadata, retry_after_s=retry_after_s, code=grpc.StatusCode.UNAVAILABLE
    )


def resource_exhausted(
    message: str, retry_after_s: float = 0.05, reason: Reason = Reason.QUEUE_FULL, **metadata: str
) -> TandemError:
    return TandemError(
        message,
        reason=reason,
        metadata=metadata,
        retry_after_s=retry_after_s,
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


def deadline_exceeded(message: str, **metadata: str) -> TandemError:
    return TandemError(
        message, reason=Reason.DEADLINE_EXCEEDED, metadata=metadata, code=grpc.StatusCode.DEADLINE_EXCEEDED
    )


def failed_precondition(message: str, reason: Reason, **metadata: str) -> TandemError:
    return TandemError(message, reason=reason, metadata=metadata, code=grpc.StatusCode.FAILED_PRECONDITION)


def unimplemented(message: str, **metadata: str) -> TandemError:
    return TandemError(message, reason=Reason.UNSUPPORTED, metadata=metadata, code=grpc.StatusCode.UNIMPLEMENTED)


def unauthenticated(message: str, reason: Reason = Reason.MISSING_CREDENTIALS, **metadata: str) -> TandemError:
    """No credentials, or credentials that match no key: UNAUTHENTICATED, saying which."""
    return TandemError(message, reason=reason, metadata=metadata, code=grpc.StatusCode.UNAUTHENTICATED)


def permission_denied(message: str, reason: Reason = Reason.MISSING_SCOPE, **metadata: str) -> TandemError:
    """A known caller without the scope the call needs: PERMISSION_DENIED."""
    return TandemError(message, reason=reason, metadata=metadata, code=grpc.StatusCode.PERMISSION_DENIED)


def rate_limited(message: str, retry_after_s: float, **metadata: str) -> TandemError:
    """Over the caller's rate: RESOURCE_EXHAUSTED with a RetryInfo saying when the bucket holds enough again."""
    return resource_exhausted(message, retry_after_s=retry_after_s, reason=Reason.RATE_LIMITED, **metadata)


def internal() -> TandemError:
    """What the caller sees for an unexpected failure: nothing about its cause (that goes to the log)."""
    return TandemError("internal error", reason=Reason.INTERNAL, code=grpc.StatusCode.INTERNAL)


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
    """A status received from another stage, kept whole so the gateway passes it on with its code and details; its
    details are also read (with the SDK's one decoder) into the error's fields, for code that looks at them."""
    details = decode_status(status)
    return TandemError(
        details.message,
        reason=details.reason or "",
        violations=tuple(FieldViolation(v.field, v.description) for v in details.field_violations),
        metadata=dict(details.metadata),
        retry_after_s=details.retry_delay_s,
        code=details.code,
        upstream=status,
    )


__all__ = [
    "DOMAIN",
    "FieldViolation",
    "Reason",
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
