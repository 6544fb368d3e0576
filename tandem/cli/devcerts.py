"""Development certificates: a throwaway CA, a server certificate and a client certificate for TLS and mTLS tests.

    python -m tandem.cli.devcerts certs/        # or scripts/gen_dev_certs.sh certs/

writes `ca.pem` (+ `ca-key.pem`), `server.pem`/`server-key.pem` and `client.pem`/`client-key.pem`. The server
certificate names localhost, 127.0.0.1 and ::1 and may also act as a client (extended key usage serverAuth and
clientAuth), because `tandem serve` uses one identity for its listeners and for the gateway's links to the stages.
Never use these in production: the CA key sits next to the certificates.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 365


@dataclass(frozen=True)
class DevCerts:
    """Paths of one generated set."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tandem dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    usages: list[x509.ObjectIdentifier],
    names: Sequence[str],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def generate(folder: Path, names: Sequence[str] = SERVER_NAMES, ca_name: str = "Tandem dev CA") -> DevCerts:
    """Writes a fresh CA, server and client certificate into `folder` (created if needed) and returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_cert, server_key = _issue(
        ca_cert, ca_key, "tandem-server", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], names
    )
    client_cert, client_key = _issue(ca_cert, ca_key, "tandem-client", [ExtendedKeyUsageOID.CLIENT_AUTH], ())
    paths = DevCerts(
        ca=folder / "ca.pem",
        ca_key=folder / "ca-key.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server-key.pem",
        client_cert=folder / "client.pem",
        client_key=folder / "client-key.pem",
    )
    pem = serialization.Encoding.PEM
    _write(paths.ca, ca_cert.public_bytes(pem))
    _write(paths.ca_key, _key_pem(ca_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(pem))
    _write(paths.server_key, _key_pem(server_key), private=True)
    _write(paths.client_cert, client_cert.public_bytes(pem))
    _write(paths.client_key, _key_pem(client_key), private=True)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gen_dev_certs", description="Write a development CA, server and client certificate."
    )
    parser.add_argument("folder", type=Path, help="where to write the PEM files")
    parser.add_argument(
        "--name", action="append", default=None, help=f"server name for the SAN (repeatable; default {SERVER_NAMES})"
    )
    opts = parser.parse_args(sys.argv[1:] if argv is None else argv)
    paths = generate(opts.folder, opts.name or SERVER_NAMES)
    for path in (paths.ca, paths.server_cert, paths.server_key, paths.client_cert, paths.client_key):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
