"""How the clients reach a gateway: channel options, TLS credentials, the API key and the default deadline."""

from __future__ import annotations

from pathlib import Path

import grpc

__all__ = ["CHANNEL_OPTIONS", "DEFAULT_TIMEOUT_S", "MAX_MESSAGE_BYTES", "api_key_metadata", "tls_credentials"]

DEFAULT_TIMEOUT_S = 30.0
# The server accepts 64 MiB messages; a large embedding batch would otherwise hit gRPC's 4 MiB receive default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def tls_credentials(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """Credentials for a gateway served with TLS: `ca` verifies its certificate (None: the system's roots), and
    `cert` with `key` present a client certificate where the gateway requires one (mTLS).

        TandemClient("gw:50051", credentials=tls_credentials("ca.pem", "client.pem", "client-key.pem"))
    """
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(
        Path(ca).read_bytes() if ca is not None else None,
        Path(key).read_bytes() if key is not None else None,
        Path(cert).read_bytes() if cert is not None else None,
    )


def api_key_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """The metadata sent with every call; over an insecure channel the key travels in clear text, so use TLS beyond
    loopback."""
    return (("x-api-key", api_key),) if api_key else None
