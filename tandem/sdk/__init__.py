"""Tandem's Python SDK: typed sync and asyncio clients for the gateway, and the decoding of its rich errors."""

from tandem.sdk.client import (
    NO_RETRY,
    AsyncTandemClient,
    Entity,
    FieldViolation,
    Label,
    ModelInfo,
    RerankResult,
    RetryPolicy,
    StreamResult,
    TandemClient,
    TandemError,
    TokenEncoding,
    tls_credentials,
)

__all__ = [
    "NO_RETRY",
    "AsyncTandemClient",
    "Entity",
    "FieldViolation",
    "Label",
    "ModelInfo",
    "RerankResult",
    "RetryPolicy",
    "StreamResult",
    "TandemClient",
    "TandemError",
    "TokenEncoding",
    "tls_credentials",
]
