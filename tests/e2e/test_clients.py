"""The Node.js, C++ and Go clients (clients/) built from protos/ and run against a live `tandem serve`: they must
agree with the Python client on vectors, keep stream order, decode the same google.rpc error details, and stream a
generation (prompt or chat, greedy or seeded) as the Python client's text; the Go client also lists the models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandem.sdk import TandemClient
from tests import ROOT
from tests.e2e.deployment import tandem_serve
from tests.fixtures import tiny_causal

pytestmark = pytest.mark.e2e

NODE_DIR = ROOT / "clients" / "node"
CPP_DIR = ROOT / "clients" / "cpp"
GO_DIR = ROOT / "clients" / "go"
# Debian's Go libraries (GOPATH mode) that the Go client imports, and the packages that install them.
GO_SYSTEM_PATH = Path("/usr/share/gocode/src")
GO_LIBRARIES = [
    "google.golang.org/grpc",
    "google.golang.org/protobuf/encoding/protojson",
    "github.com/golang/protobuf/proto",
    "google.golang.org/genproto/googleapis/rpc/errdetails",
]
GO_PACKAGES = (
    "golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev "
    "golang-google-genproto-dev protoc-gen-go protoc-gen-go-grpc"
)
# Non-ASCII and JSON-special characters too, since each text crosses a command line and a JSON printer.
TEXTS = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar on stage.",
    'naïve café: "quoted" \\ back\tslash',
    "Ein Mann spielt Gitarre.",
]


def missing(*tools: str) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


def run(
    command: list[str], cwd: Path | None = None, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = None if env is None else {**os.environ, **env}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environ)


def checked(command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = run(command, cwd, env=env)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def node_cli() -> list[str]:
    if lacking := missing("node", "npm"):
        pytest.skip(f"Node.js toolchain missing ({', '.join(lacking)}): apt-get install -y nodejs npm")
    checked(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR)
    return ["node", str(NODE_DIR / "cli.js")]


@pytest.fixture(scope="module")
def cpp_cli(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    lacking = missing("cmake", "c++", "protoc", "grpc_cpp_plugin", "pkg-config")
    if not lacking and run(["pkg-config", "--exists", "grpc++", "protobuf"]).returncode != 0:
        lacking = ["grpc++/protobuf development files"]
    if lacking:
        pytest.skip(
            f"C++ gRPC toolchain missing ({', '.join(lacking)}): apt-get install -y cmake g++ pkg-config "
            "libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc"
        )
    build = tmp_path_factory.mktemp("cpp-build")
    checked(["cmake", "-S", str(CPP_DIR), "-B", str(build)])
    checked(["cmake", "--build", str(build), "--parallel"])
    return [str(build / "tandem_client")]


def missing_go_toolchain() -> list[str]:
    lacking = missing("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc")
    return lacking + [lib for lib in GO_LIBRARIES if not (GO_SYSTEM_PATH / lib).is_dir()]


@pytest.fixture(scope="module")
def go_cli(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """clients/go built offline in GOPATH mode against Debian's Go packages, with its own build cache."""
    if lacking := missing_go_toolchain():
        pytest.skip(f"Go toolchain missing ({', '.join(lacking)}): apt-get install -y {GO_PACKAGES}")
    build = tmp_path_factory.mktemp("go-build")
    checked(["bash", str(GO_DIR / "build.sh"), str(build)], env={"GOCACHE": str(build / "cache")})
    return [str(build / "tandem_client")]


@pytest.fixture(params=["node", "cpp", "go"])
def cli(request: pytest.FixtureRequest) -> list[str]:
    command: list[str] = request.getfixturevalue(f"{request.param}_cli")
    return command


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tandem serve` with the default model (all-MiniLM-L6-v2)."""
    with tandem_serve(tmp_path_factory.mktemp("home")) as (address, _):
        yield address


@pytest.fixture(scope="module")
def classifier_gateway(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tandem serve` with only tiny-sentiment, so it loads in seconds."""
    repository = tmp_path_factory.mktemp("classifier-repository")
    shutil.copytree(served_repository / "tiny-sentiment", repository / "tiny-sentiment")
    with tandem_serve(tmp_path_factory.mktemp("home"), repository=repository) as (address, _):
        yield address


@pytest.fixture(scope="module")
def generation_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tandem serve` with only tiny-llama-chat, a text-generation model that continues a known cycle (tiny_causal)."""
    repository = tmp_path_factory.mktemp("generation-repository")
    tiny_causal.make_llama_chat(repository)
    with tandem_serve(tmp_path_factory.mktemp("home"), repository=repository) as (address, _):
        yield address


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def vectors(response: dict[str, Any]) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.array([e["values"] for e in response["embeddings"]])


def test_embed_matches_the_python_client(cli: list[str], gateway: str) -> None:
    reply = json.loads(checked([*cli, "--target", gateway, "embed", *TEXTS]))
    with TandemClient(gateway) as client:
        expected = client.embed(TEXTS)
    assert expected.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(vectors(reply), expected, atol=1e-5)
    assert (reply["model"], reply["model_version"]) == ("all-MiniLM-L6-v2", "1")


def test_stream_responses_come_in_request_order(cli: list[str], gateway: str) -> None:
    responses = json_lines(checked([*cli, "--target", gateway, "stream", *TEXTS]))
    assert [r["id"] for r in responses] == [f"r{i}" for i in range(len(TEXTS))]
    assert all("error" not in r for r in responses)
    with TandemClient(gateway) as client:
        expected = client.embed(TEXTS)
    np.testing.assert_allclose(np.concatenate([vectors(r["response"]) for r in responses]), expected, atol=1e-5)


def test_errors_are_decoded_with_their_details(cli: list[str], gateway: str) -> None:
    cases = {c["case"]: c for c in json_lines(checked([*cli, "--target", gateway, "errors"]))}
    assert set(cases) == {"empty inputs", "unknown model", "stream request with empty inputs"}

    empty = cases["empty inputs"]
    assert (empty["code"], empty["code_name"], empty["reason"], empty["domain"]) == (
        3,
        "INVALID_ARGUMENT",
        "INVALID_INPUT",
        "tandem.dev",
    )
    assert [v["field"] for v in empty["field_violations"]] == ["inputs"]
    assert "at least one" in empty["message"] and empty["field_violations"][0]["description"]
    assert empty["retry_delay_s"] is None

    unknown = cases["unknown model"]
    assert (unknown["code"], unknown["code_name"], unknown["reason"], unknown["domain"]) == (
        5,
        "NOT_FOUND",
        "MODEL_NOT_FOUND",
        "tandem.dev",
    )
    assert unknown["field_violations"] == [] and "'no-such-model' not found" in unknown["message"]

    streamed = cases["stream request with empty inputs"]
    assert (streamed["id"], streamed["code"], streamed["code_name"], streamed["reason"]) == (
        "bad",
        3,
        "INVALID_ARGUMENT",
        "INVALID_INPUT",
    )
    assert [v["field"] for v in streamed["field_violations"]] == ["inputs"]


def test_a_failed_call_exits_non_zero_with_the_decoded_error(cli: list[str], gateway: str) -> None:
    done = run([*cli, "--target", gateway, "classify", "great film"])
    assert done.returncode == 1 and done.stdout == ""
    error = json.loads(done.stderr.strip().splitlines()[-1])
    assert (error["code_name"], error["reason"]) == ("INVALID_ARGUMENT", "WRONG_TASK")
    assert [v["field"] for v in error["field_violations"]] == ["model"]


def test_classify_matches_the_python_client(cli: list[str], classifier_gateway: str) -> None:
    texts = ["what a great wonderful day", "this was a terrible boring movie"]
    reply = json.loads(checked([*cli, "--target", classifier_gateway, "--model", "tiny-sentiment", "classify", *texts]))
    with TandemClient(classifier_gateway) as client:
        expected = client.classify(texts, model="tiny-sentiment")
    served = [[(s["label"], s["score"]) for s in r["labels"]] for r in reply["results"]]
    assert [[label for label, _ in row] for row in served] == [[x.label for x in row] for row in expected]
    assert (served[0][0][0], served[1][0][0]) == ("positive", "negative")
    np.testing.assert_allclose(
        [[score for _, score in row] for row in served], [[x.score for x in row] for row in expected], atol=1e-6
    )
    top = json.loads(
        checked([*cli, "--target", classifier_gateway, "--model", "tiny-sentiment", "--top-k", "1", "classify", *texts])
    )
    assert [len(r["labels"]) for r in top["results"]] == [1, 1]


GENERATION_MODEL = "tiny-llama-chat"


def generate_command(cli: list[str], gateway: str, *options: str) -> list[str]:
    return [*cli, "--target", gateway, "--model", GENERATION_MODEL, "--max-new-tokens", "40", *options]


def test_generate_streams_the_python_clients_text(cli: list[str], generation_gateway: str) -> None:
    prompt = "sun 🍎 moon"  # the answer crosses UTF-8 boundaries mid-character (tiny_causal's module doc)
    with TandemClient(generation_gateway) as client:
        expected = client.generate_text(prompt, model=GENERATION_MODEL, max_new_tokens=40)
        stopped = client.generate_text(prompt, model=GENERATION_MODEL, max_new_tokens=40, stop=["東京", "star"])
    assert expected.text == tiny_causal.expected_continuation(prompt) and expected.finish_reason == "stop"

    *deltas, last = json_lines(checked([*generate_command(cli, generation_gateway), "generate", prompt]))
    assert len(deltas) > 1 and all(set(d) == {"text", "token_ids"} for d in deltas)
    assert "".join(d["text"] for d in deltas) == expected.text
    assert [int(i) for d in deltas for i in d["token_ids"]] == expected.token_ids  # int64 ids come as strings
    assert last == {
        "finish_reason": "stop",
        "stop_sequence": None,
        "usage": {
            "prompt_tokens": expected.usage.prompt_tokens,
            "generated_tokens": expected.usage.generated_tokens,
            "total_tokens": expected.usage.total_tokens,
        },
        "model": GENERATION_MODEL,
        "model_version": "1",
    }

    stop_options = ["--stop", "東京", "--stop", "star"]
    *deltas, last = json_lines(checked([*generate_command(cli, generation_gateway, *stop_options), "generate", prompt]))
    assert "".join(d["text"] for d in deltas) == stopped.text == " 猫 "
    assert (last["finish_reason"], last["stop_sequence"]) == ("stop_sequence", "star")


def test_generate_chat_sends_one_user_message(cli: list[str], generation_gateway: str) -> None:
    content = "sun 🍎 moon"
    with TandemClient(generation_gateway) as client:
        expected = client.generate_text(
            messages=[{"role": "user", "content": content}], model=GENERATION_MODEL, max_new_tokens=40
        )
    assert expected.text == tiny_causal.expected_continuation(content, chat=True)

    *deltas, last = json_lines(checked([*generate_command(cli, generation_gateway, "--chat"), "generate", content]))
    assert "".join(d["text"] for d in deltas) == expected.text
    assert [int(i) for d in deltas for i in d["token_ids"]] == expected.token_ids
    # the chat template's tokens make the prompt longer than the content alone
    assert (last["finish_reason"], last["usage"]["prompt_tokens"]) == ("stop", expected.usage.prompt_tokens)


def test_generate_passes_temperature_and_seed(cli: list[str], generation_gateway: str) -> None:
    """A seeded sample is the same text whoever asks; at this temperature it is not the greedy text, so the
    temperature did reach the server."""
    prompt = "sun 🍎 moon"
    with TandemClient(generation_gateway) as client:
        expected = client.generate_text(prompt, model=GENERATION_MODEL, temperature=5.0, seed=7, max_new_tokens=12)
    assert expected.text != tiny_causal.expected_continuation(prompt)[: len(expected.text)]

    options = ["--max-new-tokens", "12", "--temperature", "5", "--seed", "7"]
    *deltas, last = json_lines(checked([*generate_command(cli, generation_gateway, *options), "generate", prompt]))
    assert [int(i) for d in deltas for i in d["token_ids"]] == expected.token_ids
    assert "".join(d["text"] for d in deltas) == expected.text
    assert last["finish_reason"] == expected.finish_reason


def test_a_failed_generate_exits_non_zero_with_the_decoded_error(cli: list[str], generation_gateway: str) -> None:
    done = run([*cli, "--target", generation_gateway, "--model", "no-such-model", "generate", "sun 🍎 moon"])
    assert done.returncode == 1 and done.stdout == ""
    error = json.loads(done.stderr.strip().splitlines()[-1])
    assert (error["code"], error["code_name"], error["reason"], error["domain"]) == (
        5,
        "NOT_FOUND",
        "MODEL_NOT_FOUND",
        "tandem.dev",
    )
    assert "'no-such-model' not found" in error["message"]


def test_go_code_generates_from_every_proto_without_m_options(tmp_path: Path) -> None:
    """Every proto declares go_package, so protoc --go_out/--go-grpc_out needs no M options (issue 19)."""
    if lacking := missing("protoc", "protoc-gen-go", "protoc-gen-go-grpc"):
        pytest.skip(
            f"protoc Go plugins missing ({', '.join(lacking)}): apt-get install -y protoc-gen-go protoc-gen-go-grpc"
        )
    protos = ROOT / "protos"
    sources = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))
    checked(["protoc", "-I.", f"--go_out={tmp_path}", f"--go-grpc_out={tmp_path}", *sources], cwd=protos)
    generated = {p.relative_to(tmp_path / "tandem.dev" / "go").as_posix() for p in tmp_path.rglob("*.go")}
    assert {str(Path(s).with_suffix(".pb.go")) for s in sources} <= generated
    assert "tandem/gateway/v1/gateway_grpc.pb.go" in generated


def test_go_lists_the_models_like_the_python_client(go_cli: list[str], gateway: str) -> None:
    reply = json.loads(checked([*go_cli, "--target", gateway, "models"]))
    with TandemClient(gateway) as client:
        expected = client.list_models()
    # proto3 JSON leaves out fields at their default values, and names enum values (TASK_EMBEDDING).
    served = [
        (
            m["name"],
            m["task"].removeprefix("TASK_").lower().replace("_", "-"),
            m.get("version", ""),
            m.get("versions", []),
            m.get("embedding_dimension", 0),
            m.get("max_input_length", 0),
            m.get("ready", False),
        )
        for m in reply["models"]
    ]
    assert served == [
        (m.name, m.task, m.version, m.versions, m.embedding_dimension, m.max_input_length, m.ready) for m in expected
    ]
    assert ("all-MiniLM-L6-v2", "embedding", "1", ["1"], 384) in [row[:5] for row in served]
