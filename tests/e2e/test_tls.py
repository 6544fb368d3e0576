"""TLS with real processes: bad TLS files stop a service at start-up, and `tandem serve` with mTLS between all four."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tandem.cli import devcerts
from tandem.sdk import NO_RETRY, TandemClient, tls_credentials
from tests.e2e.deployment import tandem_serve
from tests.fixtures import reference, tiny_models


@pytest.mark.parametrize("module", ["services.tokenizer", "gateway"])
def test_a_missing_key_file_stops_the_service_at_start_up(
    certs: devcerts.DevCerts, tmp_path: Path, module: str
) -> None:
    missing = tmp_path / "missing-key.pem"
    command = [sys.executable, "-m", module, "--listen", "127.0.0.1:0", "--home", str(tmp_path)]
    command += ["--tls-cert", str(certs.server_cert), "--tls-key", str(missing)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "TLS settings: --tls-key" in last and str(missing) in last and "cannot read" in last, done.stderr


def test_tandem_serve_wants_all_three_tls_files(certs: devcerts.DevCerts, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tandem.cli", "serve", "--home", str(tmp_path), "--tls-cert", str(certs.ca)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "TLS needs all three of --tls-cert, --tls-key and --tls-ca" in done.stderr


@pytest.fixture(scope="module")
def tls_deployment(
    served_repository: Path, certs: devcerts.DevCerts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`tandem serve --tls-*` with two tokenizer replicas (an ipv4: list target) and the rest on Unix sockets."""
    repository = tmp_path_factory.mktemp("tls-repository")
    shutil.copytree(served_repository / "tiny-embed", repository / "tiny-embed")
    extra = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--tls-ca", str(certs.ca)]
    extra += ["--replicas", "tokenizer=2", "--inference-args", "--intra-op-threads 1"]
    with tandem_serve(tmp_path_factory.mktemp("home"), repository=repository, extra=extra) as (address, _):
        yield address


@pytest.mark.e2e
def test_tandem_serve_with_mtls(
    tls_deployment: str, tiny_repository: Path, certs: devcerts.DevCerts, other_certs: devcerts.DevCerts
) -> None:
    texts = tiny_models.embedding_texts(n=3)
    with TandemClient(tls_deployment, credentials=tls_credentials(certs.ca, certs.client_cert, certs.client_key)) as c:
        vectors = c.embed(texts, model="tiny-embed")
    expected = reference.reference_embeddings(tiny_repository / "tiny-embed" / "1", texts)
    assert vectors.shape == expected.shape
    assert np.sum(vectors * expected, axis=1).min() >= 0.9999
    for credentials in (
        tls_credentials(certs.ca),
        tls_credentials(certs.ca, other_certs.client_cert, other_certs.client_key),
    ):
        with (
            TandemClient(tls_deployment, credentials=credentials, timeout=5, retry=NO_RETRY) as refused,
            pytest.raises(Exception, match="UNAVAILABLE"),
        ):
            refused.embed(texts, model="tiny-embed")
