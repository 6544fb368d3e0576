"""`tandem serve --in-process tokenizer,postprocess` on the real all-MiniLM-L6-v2: two processes (gateway with the light
stages, inference), the same answers as the in-process reference, and the flags that cannot go with it refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.e2e.deployment import tandem_serve
from tests.e2e.test_default_model import TEXTS, reference_embeddings
from tests.status import details_of

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    home = tmp_path_factory.mktemp("home")
    with tandem_serve(home, extra=["--in-process", "tokenizer,postprocess"]) as running:
        yield running


def test_embeddings_match_the_in_process_reference(served: tuple[str, subprocess.Popen[str]]) -> None:
    with grpc.insecure_channel(served[0]) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        reply, call = stub.Embed.with_call(gateway_pb2.EmbedRequest(inputs=TEXTS))
        trailers = dict(call.trailing_metadata() or ())
    served_rows = np.array([e.values for e in reply.embeddings], dtype=np.float32)
    cosines = np.sum(served_rows * reference_embeddings(TEXTS), axis=1)
    assert served_rows.shape == (len(TEXTS), 384)
    assert cosines.min() > 0.9999, cosines
    assert "tokenize=" in str(trailers["x-tandem-timing"]) and "postprocess=" in str(trailers["x-tandem-timing"])


def test_tokenize_and_errors_answer_from_the_gateways_process(served: tuple[str, subprocess.Popen[str]]) -> None:
    with grpc.insecure_channel(served[0]) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        tokens = stub.Tokenize(gateway_pb2.TokenizeRequest(inputs=["hello world"]))
        assert list(tokens.encodings[0].ids) == [101, 7592, 2088, 102]
        with pytest.raises(grpc.RpcError) as caught:
            stub.Embed(gateway_pb2.EmbedRequest(inputs=["word " * 300], truncate=False))
    d = details_of(caught.value)
    assert (d.code, d.reason, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LONG", ["inputs[0]"])


def test_two_processes_and_sigterm_stops_both(served: tuple[str, subprocess.Popen[str]]) -> None:
    out = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(served[1].pid)], capture_output=True, text=True, check=True
    ).stdout
    assert "-m gateway" in out and "services.inference" in out, out
    assert "services.tokenizer" not in out and "services.postprocess" not in out, out
    children = [int(line.split()[0]) for line in out.splitlines() if line.strip()]
    served[1].send_signal(signal.SIGTERM)
    assert served[1].wait(60) == 0
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--in-process", "inference"], "bad in-process stage 'inference'"),
        (["--in-process", "tokenizer", "--replicas", "tokenizer=2"], "runs in the gateway's process"),
        (["--in-process", "postprocess", "--postprocess-args", "--log-level DEBUG"], "use --gateway-args"),
    ],
)
def test_flags_that_cannot_go_with_in_process_stages_are_refused(
    flags: list[str], message: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "serve", "--home", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr
