"""tandem.sdk.status, the one google.rpc.Status decoder: what it reads from a refusal's trailer, for the SDK, the
bench (RetryInfo, to wait before its next call), the tests and the gateway (a stage's status passed on)."""

from __future__ import annotations

import grpc
from grpc_status import rpc_status

from services.common import errors
from tandem.sdk.status import FieldViolation, code_of, decode_rpc_error, decode_status


def refusal(err: errors.TandemError) -> grpc.aio.AioRpcError:
    status = rpc_status.to_status(err.to_status_proto())
    return grpc.aio.AioRpcError(
        status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata), status.details
    )


def test_retry_delay_reads_the_refusals_retry_info() -> None:
    assert decode_rpc_error(refusal(errors.resource_exhausted("busy", retry_after_s=0.25))).retry_delay_s == 0.25
    assert decode_rpc_error(refusal(errors.invalid_argument("bad", "inputs"))).retry_delay_s is None


def test_error_info_and_bad_request_are_read() -> None:
    details = decode_rpc_error(refusal(errors.invalid_argument("inputs[1] is empty", "inputs[1]", model="m")))
    assert (details.code, details.message) == (grpc.StatusCode.INVALID_ARGUMENT, "inputs[1] is empty")
    assert (details.reason, details.domain, dict(details.metadata)) == ("INVALID_INPUT", errors.DOMAIN, {"model": "m"})
    assert details.field_violations == (FieldViolation("inputs[1]", "inputs[1] is empty"),)
    assert details.fields == ["inputs[1]"]
    assert decode_status(errors.invalid_argument("inputs[1] is empty", "inputs[1]", model="m").to_status_proto()) == (
        details
    )


def test_a_call_without_a_status_trailer_has_code_and_message_only() -> None:
    bare = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "reset")
    details = decode_rpc_error(bare)
    assert (details.code, details.message, details.reason, details.fields, details.retry_delay_s) == (
        grpc.StatusCode.UNAVAILABLE,
        "reset",
        None,
        [],
        None,
    )
    assert code_of(14) == grpc.StatusCode.UNAVAILABLE and code_of(99) == grpc.StatusCode.UNKNOWN


def test_a_stage_status_passed_on_keeps_its_details() -> None:
    status = errors.resource_exhausted("queue full", retry_after_s=0.5).to_status_proto()
    passed_on = errors.from_upstream(status)
    assert passed_on.to_status_proto() is status
    assert (passed_on.code, passed_on.reason, passed_on.retry_after_s) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "QUEUE_FULL",
        0.5,
    )
    assert errors.reason_of(passed_on) == "QUEUE_FULL"
