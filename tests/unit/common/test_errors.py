"""The error table: each reason's wire string and status code, and the helpers that send them."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from services.common import errors
from services.common.errors import Reason

# Clients match on these strings: a renamed member must not change what goes on the wire.
WIRE = {
    "INVALID_INPUT": grpc.StatusCode.INVALID_ARGUMENT,
    "WRONG_TASK": grpc.StatusCode.INVALID_ARGUMENT,
    "INPUT_TOO_LONG": grpc.StatusCode.INVALID_ARGUMENT,
    "TOO_MANY_INPUTS": grpc.StatusCode.INVALID_ARGUMENT,
    "NO_CHAT_TEMPLATE": grpc.StatusCode.INVALID_ARGUMENT,
    "UNSUPPORTED": grpc.StatusCode.UNIMPLEMENTED,
    "MODEL_NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "MODEL_NOT_READY": grpc.StatusCode.UNAVAILABLE,
    "MODEL_NOT_LOADED": grpc.StatusCode.FAILED_PRECONDITION,
    "MODEL_BROKEN": grpc.StatusCode.FAILED_PRECONDITION,
    "MODEL_CONFIG_INVALID": grpc.StatusCode.FAILED_PRECONDITION,
    "TOKENIZER_MISMATCH": grpc.StatusCode.FAILED_PRECONDITION,
    "TOKENIZER_BROKEN": grpc.StatusCode.FAILED_PRECONDITION,
    "REPOSITORY_NOT_WRITABLE": grpc.StatusCode.FAILED_PRECONDITION,
    "QUEUE_FULL": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "RATE_LIMITED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "MESSAGE_TOO_LARGE": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "STAGE_UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "MISSING_CREDENTIALS": grpc.StatusCode.UNAUTHENTICATED,
    "INVALID_API_KEY": grpc.StatusCode.UNAUTHENTICATED,
    "MISSING_SCOPE": grpc.StatusCode.PERMISSION_DENIED,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}


def test_the_table_holds_the_wire_strings_and_their_codes() -> None:
    assert {reason.value: reason.code for reason in Reason} == WIRE


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (errors.invalid_argument("bad", "inputs"), Reason.INVALID_INPUT),
        (errors.not_found("gone"), Reason.MODEL_NOT_FOUND),
        (errors.unavailable("loading"), Reason.MODEL_NOT_READY),
        (errors.resource_exhausted("full"), Reason.QUEUE_FULL),
        (errors.deadline_exceeded("late"), Reason.DEADLINE_EXCEEDED),
        (errors.unimplemented("no"), Reason.UNSUPPORTED),
        (errors.unauthenticated("who"), Reason.MISSING_CREDENTIALS),
        (errors.permission_denied("not you"), Reason.MISSING_SCOPE),
        (errors.rate_limited("slow down", retry_after_s=1.0), Reason.RATE_LIMITED),
        (errors.internal(), Reason.INTERNAL),
        *[
            (errors.failed_precondition("broken", reason), reason)
            for reason in Reason
            if reason.code == grpc.StatusCode.FAILED_PRECONDITION
        ],
    ],
    ids=str,
)
def test_helpers_send_their_reason_with_its_code(error: errors.TandemError, reason: Reason) -> None:
    status = error.to_status_proto()
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (status.code, info.reason, info.domain) == (reason.code.value[0], reason.value, errors.DOMAIN)
    assert errors.reason_of(error) == reason.value
