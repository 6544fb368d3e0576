"""TandemError: what every failed call raises, with the gRPC code and the google.rpc details the server sent."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from tandem.gateway.v1 import gateway_pb2
from tandem.sdk.status import FieldViolation, code_of, decode_rpc_error

__all__ = ["FieldViolation", "TandemError"]


class TandemError(Exception):
    """A failed call: the gRPC code and message, plus the google.rpc details Tandem attaches to every error."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        domain: str | None = None,
        metadata: dict[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = metadata or {}
        self.field_violations = list(field_violations)
        self.retry_delay_s = retry_delay_s

    @property
    def fields(self) -> list[str]:
        """Names of the bad fields, such as ["inputs"] or ["inputs[1]"]."""
        return [v.field for v in self.field_violations]

    def __str__(self) -> str:
        reason = f" ({self.reason})" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    @classmethod
    def from_rpc_error(cls, rpc_error: grpc.RpcError) -> TandemError:
        """Reads code, message and the `grpc-status-details-bin` trailer of a failed call (sync or asyncio)."""
        details = decode_rpc_error(rpc_error)
        return cls(
            details.code,
            details.message,
            reason=details.reason,
            domain=details.domain,
            metadata=dict(details.metadata),
            field_violations=details.field_violations,
            retry_delay_s=details.retry_delay_s,
        )

    @classmethod
    def from_stream_error(cls, error: gateway_pb2.StreamError) -> TandemError:
        """The error of one EmbedStream request, which travels in its response rather than in a trailer."""
        return cls(
            code_of(error.code),
            error.message,
            reason=error.reason or None,
            field_violations=[FieldViolation(f) for f in error.fields],
        )
