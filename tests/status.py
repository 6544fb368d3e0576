"""Reads the google.rpc details a Tandem error carries, so tests can check code, message and details together: the
SDK's one decoder (tandem/sdk/status.py), under the names the tests use (d.code, d.message, d.reason, d.fields,
d.retry_delay_s)."""

from __future__ import annotations

from tandem.sdk.status import StatusDetails as Details
from tandem.sdk.status import decode_rpc_error as details_of

__all__ = ["Details", "details_of"]
