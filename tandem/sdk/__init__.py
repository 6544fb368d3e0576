"""Tandem's Python SDK: typed asyncio and blocking clients for the gateway, and the decoding of its rich errors.

aio.py (AsyncTandemClient) and client.py (TandemClient) are the two transports; converters.py builds their requests
and reads their results, retry.py decides when to call again, errors.py and status.py decode failures, types.py holds
the results, channel.py the channel options and TLS credentials.
"""

from tandem.sdk.aio import AsyncTandemClient
from tandem.sdk.channel import tls_credentials
from tandem.sdk.client import GenerationStream, TandemClient
from tandem.sdk.errors import FieldViolation, TandemError
from tandem.sdk.retry import NO_RETRY, RetryPolicy
from tandem.sdk.types import (
    AccuracyReport,
    Derivation,
    Entity,
    FinishReason,
    GenerationDelta,
    GenerationResult,
    GenerationUsage,
    Label,
    ModelInfo,
    Provenance,
    RerankResult,
    StreamResult,
    TokenEncoding,
    TokenLogprob,
)

__all__ = [
    "NO_RETRY",
    "AccuracyReport",
    "AsyncTandemClient",
    "Derivation",
    "Entity",
    "FieldViolation",
    "FinishReason",
    "GenerationDelta",
    "GenerationResult",
    "GenerationStream",
    "GenerationUsage",
    "Label",
    "ModelInfo",
    "Provenance",
    "RerankResult",
    "RetryPolicy",
    "StreamResult",
    "TandemClient",
    "TandemError",
    "TokenEncoding",
    "TokenLogprob",
    "tls_credentials",
]
