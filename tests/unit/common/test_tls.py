"""TLS settings without a server: what is read, unix targets checked for localhost, bad settings naming their flag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.common import tls
from tandem.cli import devcerts


def test_load_reads_nothing_without_tls_settings() -> None:
    from services.tokenizer.settings import TokenizerSettings

    assert tls.load(TokenizerSettings()) == tls.ServiceTls(None, None)


def test_unix_targets_are_checked_for_localhost(certs: devcerts.DevCerts) -> None:
    security = tls.channel_security(certs.ca)
    assert security is not None
    assert security.options("unix:/run/x.sock") == [("grpc.ssl_target_name_override", "localhost")]
    assert security.options("127.0.0.1:1") == []
    named = tls.channel_security(certs.ca, server_name="stage.internal")
    assert named is not None and named.options("unix:/x") == [("grpc.ssl_target_name_override", "stage.internal")]


def _bad_settings(
    certs: devcerts.DevCerts, other: devcerts.DevCerts, tmp: Path
) -> dict[str, tuple[dict[str, Any], str]]:
    garbage = tmp / "garbage.pem"
    garbage.write_text("not a certificate\n")
    return {
        "missing key file": ({"tls_cert": certs.server_cert, "tls_key": tmp / "nope.pem"}, "--tls-key"),
        "cert without key": ({"tls_cert": certs.server_cert}, "--tls-cert needs --tls-key"),
        "key of another cert": ({"tls_cert": certs.server_cert, "tls_key": other.server_key}, "is not the private key"),
        "cert not PEM": ({"tls_cert": garbage, "tls_key": certs.server_key}, "not a PEM certificate"),
        "client CA without cert": ({"tls_client_ca": certs.ca}, "--tls-client-ca needs --tls-cert"),
        "client CA missing": (
            {"tls_cert": certs.server_cert, "tls_key": certs.server_key, "tls_client_ca": tmp / "ca.pem"},
            "--tls-client-ca",
        ),
        "CA missing": ({"tls_ca": tmp / "none.pem"}, "--tls-ca"),
        "client cert without CA": (
            {"tls_client_cert": certs.client_cert, "tls_client_key": certs.client_key},
            "needs --tls-ca",
        ),
    }


BAD_SETTINGS = [
    "missing key file",
    "cert without key",
    "key of another cert",
    "cert not PEM",
    "client CA without cert",
    "client CA missing",
    "CA missing",
    "client cert without CA",
]


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_bad_settings_name_the_flag(
    certs: devcerts.DevCerts, other_certs: devcerts.DevCerts, tmp_path: Path, case: str
) -> None:
    from gateway.settings import GatewaySettings

    fields, message = _bad_settings(certs, other_certs, tmp_path)[case]
    with pytest.raises(tls.TlsError, match=message):
        tls.load(GatewaySettings(**fields))
