"""Reads the google.rpc details a Tandem error carries, so tests can check code, message and details together."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass
class Details:
    code: grpc.StatusCode
    message: str
    reason: str | None
    fields: list[str]
    retry_delay_s: float | None


def details_of(err: grpc.RpcError) -> Details:
    call: grpc.Call = err  # type: ignore[assignment]
    status = rpc_status.from_call(call)
    reason = None
    fields: list[str] = []
    retry = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields = [v.field for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info_r = error_details_pb2.RetryInfo()
                detail.Unpack(info_r)
                retry = info_r.retry_delay.ToNanoseconds() / 1e9
    return Details(call.code(), call.details() or "", reason, fields, retry)
