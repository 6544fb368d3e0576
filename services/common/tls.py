"""TLS and mTLS credentials from PEM files: server credentials for a listener, channel credentials for stage links.

Files are read and checked once at start-up, so a wrong path or a key that does not match its certificate stops
the service with a message naming the setting, instead of a bare handshake failure at the first call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.common.settings import ServiceSettings


class TlsError(ValueError):
    """A TLS setting that cannot be used: missing or unreadable file, not PEM, or a key that is not the cert's."""


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"--{setting} {path}: cannot read: {exc.strerror or exc}") from None


def read_certificates(path: Path, setting: str) -> bytes:
    """The PEM bytes of one or more certificates (a certificate chain or a CA bundle)."""
    data = _read(path, setting)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsError(f"--{setting} {path}: not a PEM certificate") from None
    return data


def read_key_pair(cert_path: Path, key_path: Path, cert_setting: str, key_setting: str) -> tuple[bytes, bytes]:
    """(key PEM, certificate chain PEM), checked to belong together."""
    chain = read_certificates(cert_path, cert_setting)
    key_data = _read(key_path, key_setting)
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise TlsError(f"--{key_setting} {key_path}: not an unencrypted PEM private key") from None
    leaf = x509.load_pem_x509_certificates(chain)[0]
    pem, spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(pem, spki) != leaf.public_key().public_bytes(pem, spki):
        raise TlsError(f"--{key_setting} {key_path} is not the private key of --{cert_setting} {cert_path}")
    return key_data, chain


def _pair(cert: Path | None, key: Path | None, cert_setting: str, key_setting: str) -> tuple[bytes, bytes] | None:
    if (cert is None) != (key is None):
        given, missing = (cert_setting, key_setting) if key is None else (key_setting, cert_setting)
        raise TlsError(f"--{given} needs --{missing} as well")
    if cert is None or key is None:
        return None
    return read_key_pair(cert, key, cert_setting, key_setting)


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> grpc.ServerCredentials | None:
    """TLS when cert and key are given; with `client_ca` also mTLS (a client certificate signed by it is required).

    None (plaintext) when neither is given.
    """
    pair = _pair(cert, key, "tls-cert", "tls-key")
    if pair is None:
        if client_ca is not None:
            raise TlsError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS plus client certificates)")
        return None
    roots = read_certificates(client_ca, "tls-client-ca") if client_ca is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=roots is not None)


@dataclass(frozen=True)
class ChannelSecurity:
    """What a secure channel needs: credentials, and the name the server's certificate must carry if not the target's.

    gRPC checks the server certificate against the target's host; `server_name` overrides that, for targets such as
    an `ipv4:` address list (checked against the whole list otherwise) or a certificate issued for another name.
    A `unix:` target is checked against `localhost` unless `server_name` says otherwise.
    """

    credentials: grpc.ChannelCredentials
    server_name: str | None = None

    def options(self, target: str = "") -> list[tuple[str, Any]]:
        name = self.server_name
        if name is None and target.startswith(("unix:", "unix-abstract:")):
            # gRPC would check the socket path, which no certificate names; a local socket's server is localhost.
            name = "localhost"
        return [("grpc.ssl_target_name_override", name)] if name else []


def channel_security(
    ca: Path | None,
    cert: Path | None = None,
    key: Path | None = None,
    server_name: str | None = None,
    *,
    cert_setting: str = "tls-client-cert",
    key_setting: str = "tls-client-key",
) -> ChannelSecurity | None:
    """TLS to servers whose certificate `ca` signed; `cert`/`key` present a client certificate (mTLS).

    None (plaintext) when no CA is given: a channel never falls back to the system roots by accident.
    """
    pair = _pair(cert, key, cert_setting, key_setting)
    if ca is None:
        if pair is not None or server_name is not None:
            raise TlsError("a client certificate or --tls-server-name needs --tls-ca (the CA of the servers)")
        return None
    roots = read_certificates(ca, "tls-ca")
    private_key, chain = pair if pair is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(roots, private_key, chain)
    return ChannelSecurity(credentials, server_name)


@dataclass(frozen=True)
class ServiceTls:
    """One process's TLS: its listener's credentials and its outgoing links' security (None: plaintext)."""

    server: grpc.ServerCredentials | None = None
    channels: ChannelSecurity | None = None


def load(settings: ServiceSettings) -> ServiceTls:
    """Reads and checks every TLS file the settings name; raises TlsError with the setting's flag name."""
    return ServiceTls(
        server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca),
        _settings_channel_security(settings),
    )


def _settings_channel_security(settings: ServiceSettings) -> ChannelSecurity | None:
    """--tls-ca, and as client identity --tls-client-cert/--tls-client-key, or else the listener's own
    --tls-cert/--tls-key (one identity per process, as `tandem serve` runs it)."""
    if settings.tls_client_cert is not None or settings.tls_client_key is not None:
        return channel_security(
            settings.tls_ca, settings.tls_client_cert, settings.tls_client_key, settings.tls_server_name
        )
    if settings.tls_ca is None:
        return channel_security(None, server_name=settings.tls_server_name)
    return channel_security(
        settings.tls_ca,
        settings.tls_cert,
        settings.tls_key,
        settings.tls_server_name,
        cert_setting="tls-cert",
        key_setting="tls-key",
    )


def secure_or_insecure_channel(
    target: str,
    options: Sequence[tuple[str, Any]],
    security: ChannelSecurity | None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A `grpc.aio` channel: secure when `security` is given, plaintext otherwise; `options` kept either way."""
    if security is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(
        target, security.credentials, options=[*options, *security.options(target)], interceptors=interceptors
    )


def load_or_exit(settings: ServiceSettings, prog: str) -> ServiceTls:
    """`load` for a service's main(): a bad setting ends the process with exit code 1 and one clear line."""
    try:
        return load(settings)
    except TlsError as exc:
        raise SystemExit(f"{prog}: TLS settings: {exc}") from None
