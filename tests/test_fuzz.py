"""Hostile input to every service: random bytes, random and malformed messages, huge repeated fields, bad UTF-8.

Every answer must be a documented status code (never UNKNOWN or INTERNAL), no server goes down, and a normal request
right after the fuzzing returns the same result as before it. Each fuzz test tallies the messages it sent and the
codes it got: printed on one line (visible with `-s`) and, when TANDEM_FUZZ_REPORT names a file, appended to it as one
JSON line per test.

Hypothesis drives blocking gRPC channels from a worker thread while the in-process servers run on the test's event
loop. The examples are bounded so that the file stays well under a minute and a half once the stack is up.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.repository import ModelRepository
from services.common.server import start_server
from services.inference.core import Inference
from services.inference.servicer import management_registrar
from services.inference.servicer import registrar as inference_registrar
from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.inference.v1 import inference_pb2, inference_pb2_grpc
from tandem.management.v1 import management_pb2
from tandem.oip.v2 import grpc_service_pb2 as oip
from tandem.postprocess.v1 import postprocess_pb2, postprocess_pb2_grpc
from tandem.tensor.v1 import tensor_pb2
from tandem.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tests.conftest import Stack
from tests.gateways import Gateway, gateway_over
from tests.status import details_of

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples on every run: a failure here is reproducible, not a flake
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TIMEOUT_S = 20.0
# What a hostile request may get: an answer, or a refusal that names the request as the problem.
CLIENT_FAULTS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
# Codes that mean a failure of ours, never a fair answer to a request, however hostile.
OUR_FAULTS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
REPORT_ENV = "TANDEM_FUZZ_REPORT"


@pytest.fixture(scope="module")
async def gateway(stack: Stack) -> AsyncIterator[Gateway]:
    async with gateway_over(stack, max_inputs=16, max_input_chars=5_000) as gateway:
        yield gateway


@pytest.fixture(scope="module")
async def managed_inference(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """An inference stage serving InferenceService and ManagementService over its own copy of the repository.

    Random management requests may load, unload or alias models (and write aliases.json); they must not do that to
    the session's stack.
    """
    root = tmp_path_factory.mktemp("fuzz")
    repository = root / "repository"
    shutil.copytree(tiny_repository, repository)
    core = Inference(ModelRepository(repository), home=root / "home", intra_op_threads=1, watch_s=None)
    await core.start()
    server = await start_server("127.0.0.1:0", [inference_registrar(core), management_registrar(core)])
    try:
        yield server.address
    finally:
        await server.stop(0)
        await core.close()


# ---------------------------------------------------------------------------------------------------------- tally


@dataclass
class Tally:
    """Messages sent and codes seen by one fuzz test; `crashes` counts servers that stopped answering after it."""

    test: str
    sent: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    servers: int = 0
    crashes: int | None = None  # None until the after-check ran

    def send(self, call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
        self.sent += 1
        try:
            call()
        except grpc.RpcError as err:
            code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
            details = err.details() or ""  # type: ignore[attr-defined]
        else:
            code, details = grpc.StatusCode.OK, ""
        self.codes[code.name] += 1
        return code, details

    def still_up(self, channels: list[grpc.Channel]) -> None:
        """Every fuzzed server still answers its health check with SERVING."""
        down = 0
        for channel in channels:
            try:
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
                down += health.status != health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                down += 1
        self.servers, self.crashes = len(channels), down
        assert down == 0, f"{down} of {len(channels)} servers down after fuzzing"

    def line(self) -> dict[str, Any]:
        return {
            "test": self.test,
            "messages": self.sent,
            "codes": dict(sorted(self.codes.items())),
            "servers": self.servers,
            "crashes": self.crashes,
        }


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    tally = Tally(request.node.name)
    yield tally
    line = tally.line()
    codes = ", ".join(f"{code} {n}" for code, n in line["codes"].items())
    print(f"\nfuzz {tally.test}: {tally.sent} messages; {codes}; crashes {tally.crashes}")
    report = os.environ.get(REPORT_ENV)
    if report:
        with open(report, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")


async def in_thread(run: Callable[[], None]) -> None:
    """Blocking Hypothesis loop off the event loop, which keeps serving meanwhile."""
    await asyncio.to_thread(run)


def methods_of(module: Any, service: str) -> list[str]:
    """The full paths of a service's methods that take one request message (all but client streams)."""
    descriptor = module.DESCRIPTOR.services_by_name[service]
    return [f"/{descriptor.full_name}/{m.name}" for m in descriptor.methods if not m.client_streaming]


def methods_streaming(module: Any, service: str) -> list[str]:
    descriptor = module.DESCRIPTOR.services_by_name[service]
    return [f"/{descriptor.full_name}/{m.name}" for m in descriptor.methods if m.client_streaming]


def path(module: Any, service: str, method: str) -> str:
    return f"/{module.DESCRIPTOR.services_by_name[service].full_name}/{method}"


def ids_tensor(ids: list[int], dtype: int = tensor_pb2.DATA_TYPE_INT64) -> tensor_pb2.Tensor:
    kind = np.int64 if dtype == tensor_pb2.DATA_TYPE_INT64 else np.int32
    return tensor_pb2.Tensor(dtype=dtype, shape=[len(ids)], data=np.array(ids, dtype=kind).tobytes())  # type: ignore[arg-type]


def float_tensor(values: Any) -> tensor_pb2.Tensor:
    array = np.asarray(values, dtype=np.float32)
    return tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=array.shape, data=array.tobytes())  # type: ignore[arg-type]


def ragged(lengths: list[int]) -> tensor_pb2.Tensor:
    return ids_tensor([0, *np.cumsum(lengths).tolist()], tensor_pb2.DATA_TYPE_INT32)


# A well-formed batch for every tiny model: two sequences of small ids.
REFERENCE_BATCH = tensor_pb2.TokenBatch(input_ids=ids_tensor([2, 5, 7, 3, 2, 9, 3]), cu_seqlens=ragged([4, 3]))
REFERENCE_EMBEDDINGS = float_tensor(np.arange(192, dtype=np.float32).reshape(6, 32) / 97 - 1)  # tiny-embed: 32 wide
# What the tokenizer stage would send along for tiny-ner: offsets into the texts and the special-token mask.
NER_BATCH = tensor_pb2.TokenBatch(
    input_ids=REFERENCE_BATCH.input_ids,
    cu_seqlens=REFERENCE_BATCH.cu_seqlens,
    offsets=ids_tensor([0, 0, 0, 3, 4, 7, 0, 0, 0, 0, 0, 2, 0, 0], tensor_pb2.DATA_TYPE_INT32),
    special_tokens_mask=tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_UINT8, shape=[7], data=bytes([1, 0, 0, 1, 1, 0, 1])
    ),
)
NER_BATCH.offsets.shape[:] = [7, 2]
NER_TEXTS = ["abc def", "xy"]

# Valid requests per method; mutated copies of them reach past parsing into the servicers. Management requests name
# models that do not exist (or reload one), so no mutation can unload what the after-check uses.
SEEDS: dict[str, list[Message]] = {
    path(gateway_pb2, "GatewayService", "Embed"): [gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["a b", "c"])],
    path(gateway_pb2, "GatewayService", "Rerank"): [
        gateway_pb2.RerankRequest(model="tiny-rerank", query="q", documents=["a", "b"])
    ],
    path(gateway_pb2, "GatewayService", "Detokenize"): [gateway_pb2.DetokenizeRequest(model="tiny-embed", ids=[2, 5])],
    path(oip, "GRPCInferenceService", "ModelInfer"): [
        oip.ModelInferRequest(
            model_name="tiny-embed",
            inputs=[
                oip.ModelInferRequest.InferInputTensor(
                    name="text",
                    datatype="BYTES",
                    shape=[2],
                    contents=oip.InferTensorContents(bytes_contents=[b"a", b"b"]),
                )
            ],
        )
    ],
    path(tokenizer_pb2, "TokenizerService", "Tokenize"): [
        tokenizer_pb2.TokenizeRequest(model="tiny-embed", texts=["hello world", "é"], return_offsets=True),
        tokenizer_pb2.TokenizeRequest(model="tiny-rerank", texts=["q"], text_pairs=["d"], return_tokens=True),
    ],
    path(tokenizer_pb2, "TokenizerService", "Detokenize"): [
        tokenizer_pb2.DetokenizeRequest(model="tiny-embed", ids=[2, 5, 7, 3])
    ],
    path(inference_pb2, "InferenceService", "Infer"): [
        inference_pb2.InferRequest(model=model, batch=REFERENCE_BATCH)
        for model in ("tiny-embed", "tiny-ner", "tiny-rerank")
    ],
    path(inference_pb2, "InferenceService", "GetModel"): [inference_pb2.GetModelRequest(model="tiny-embed")],
    path(management_pb2, "ManagementService", "LoadModel"): [management_pb2.LoadModelRequest(name="no-such-model")],
    path(management_pb2, "ManagementService", "UnloadModel"): [management_pb2.UnloadModelRequest(name="no-such-model")],
    path(management_pb2, "ManagementService", "SetAlias"): [
        management_pb2.SetAliasRequest(name="no-such-model", alias="fuzz", version="1")
    ],
    path(management_pb2, "ManagementService", "DeleteAlias"): [
        management_pb2.DeleteAliasRequest(name="no-such-model", alias="fuzz")
    ],
    path(management_pb2, "ManagementService", "ReloadModel"): [management_pb2.ReloadModelRequest(name="tiny-rerank")],
    path(postprocess_pb2, "PostprocessService", "Pool"): [
        postprocess_pb2.PoolRequest(
            model="tiny-embed", token_embeddings=REFERENCE_EMBEDDINGS, cu_seqlens=ragged([2, 4]), normalize=True
        )
    ],
    path(postprocess_pb2, "PostprocessService", "Classify"): [
        postprocess_pb2.ClassifyRequest(model="tiny-sentiment", logits=float_tensor([[0.5, -1.0, 0.2]]), top_k=1)
    ],
    path(postprocess_pb2, "PostprocessService", "Rerank"): [
        postprocess_pb2.RerankRequest(model="tiny-rerank", logits=float_tensor([[0.5], [2.0]]), top_n=1)
    ],
}


@st.composite
def payloads(draw: st.DrawFn, method: str) -> bytes:
    """Random bytes, or a valid request of `method` with bytes flipped, cut off or appended."""
    seeds = SEEDS.get(method, [])
    if not seeds or draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(seeds)).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        edit = draw(st.integers(0, 2))
        if edit == 0 and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif edit == 1:
            del data[draw(st.integers(0, len(data))) :]
        else:
            data += draw(st.binary(max_size=16))
    return bytes(data)


def calls(methods: list[str], streams: list[str] = ()) -> st.SearchStrategy[tuple[str, bytes]]:  # type: ignore[assignment]
    return st.sampled_from([*methods, *streams]).flatmap(lambda m: st.tuples(st.just(m), payloads(m)))


# ------------------------------------------------------------------------------------------- normal requests after


def normal_embed(channel: grpc.Channel) -> Any:
    reply = gateway_pb2_grpc.GatewayServiceStub(channel).Embed(
        gateway_pb2.EmbedRequest(model="tiny-embed", inputs=["still here", "and right"]), timeout=TIMEOUT_S
    )
    return np.array([list(e.values) for e in reply.embeddings])


def normal_tokenize(channel: grpc.Channel) -> Any:
    reply = tokenizer_pb2_grpc.TokenizerServiceStub(channel).Tokenize(
        tokenizer_pb2.TokenizeRequest(model="tiny-embed", texts=["still here"], return_offsets=True), timeout=TIMEOUT_S
    )
    return reply.SerializeToString(deterministic=True)


def normal_infer(channel: grpc.Channel) -> Any:
    reply = inference_pb2_grpc.InferenceServiceStub(channel).Infer(
        inference_pb2.InferRequest(model="tiny-embed", batch=REFERENCE_BATCH), timeout=TIMEOUT_S
    )
    return np.frombuffer(reply.output.data, dtype=np.float32).reshape(tuple(reply.output.shape))


def normal_pool(channel: grpc.Channel) -> Any:
    reply = postprocess_pb2_grpc.PostprocessServiceStub(channel).Pool(
        postprocess_pb2.PoolRequest(
            model="tiny-embed", token_embeddings=REFERENCE_EMBEDDINGS, cu_seqlens=ragged([2, 4]), normalize=True
        ),
        timeout=TIMEOUT_S,
    )
    return reply.SerializeToString(deterministic=True)


NORMAL: dict[str, Callable[[grpc.Channel], Any]] = {
    "gateway": normal_embed,
    "tokenizer": normal_tokenize,
    "inference": normal_infer,
    "postprocess": normal_pool,
}


def assert_same(after: Any, before: Any) -> None:
    if isinstance(before, np.ndarray):
        assert after.shape == before.shape
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    else:
        assert after == before


@dataclass
class Targets:
    """The address of each service the fuzz tests talk to."""

    addresses: dict[str, str]

    def channels(self) -> dict[str, grpc.Channel]:
        return {name: grpc.insecure_channel(address) for name, address in self.addresses.items()}


@pytest.fixture(scope="module")
def targets(stack: Stack, gateway: Gateway, managed_inference: str) -> Targets:
    return Targets(
        {
            "gateway": gateway.server.address,
            "tokenizer": stack.stages["tokenizer"].address,
            "inference": managed_inference,
            "postprocess": stack.stages["postprocess"].address,
        }
    )


def fuzzing(tally: Tally, targets: Targets, body: Callable[[dict[str, grpc.Channel]], None]) -> Callable[[], None]:
    """Runs `body` between a normal request to every service and the same request after: same answers, all up."""

    def run() -> None:
        channels = targets.channels()
        try:
            before = {name: NORMAL[name](channel) for name, channel in channels.items()}
            body(channels)
            tally.still_up(list(channels.values()))
            for name, channel in channels.items():
                assert_same(NORMAL[name](channel), before[name])
        finally:
            for channel in channels.values():
                channel.close()

    return run


# ---------------------------------------------------------------------------------------------------------- texts

weird = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)  # any code point but lone surrogates
texts = st.one_of(
    weird,
    st.just(""),
    st.just("\x00"),
    st.text(st.sampled_from(["\x00", "\u200b", "\ufeff", "\U0010ffff", "\u0301", "ﷺ", "\n", " ", "a"]), max_size=50),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "🙂", "\x00", " "]), st.integers(1_000, 6_000)),
)


async def test_random_texts_are_answered_or_refused_never_internal(targets: Targets, tally: Tally) -> None:
    def body(channels: dict[str, grpc.Channel]) -> None:
        stub = gateway_pb2_grpc.GatewayServiceStub(channels["gateway"])

        @FUZZ
        @given(inputs=st.lists(texts, max_size=4), truncate=st.booleans(), rpc=st.integers(0, 3))
        def check(inputs: list[str], truncate: bool, rpc: int) -> None:
            calls = [
                lambda: stub.Embed(
                    gateway_pb2.EmbedRequest(model="tiny-embed", inputs=inputs, truncate=truncate), timeout=TIMEOUT_S
                ),
                lambda: stub.ClassifyTokens(
                    gateway_pb2.ClassifyTokensRequest(model="tiny-ner", inputs=inputs, truncate=truncate),
                    timeout=TIMEOUT_S,
                ),
                lambda: stub.Tokenize(
                    gateway_pb2.TokenizeRequest(model="tiny-embed", inputs=inputs), timeout=TIMEOUT_S
                ),
                lambda: stub.Rerank(
                    gateway_pb2.RerankRequest(
                        model="tiny-rerank", query=inputs[0] if inputs else "", documents=inputs[1:], truncate=truncate
                    ),
                    timeout=TIMEOUT_S,
                ),
            ]
            code, details = tally.send(calls[rpc])
            assert code in CLIENT_FAULTS, (code, details, [t[:40] for t in inputs])

        check()
        assert tally.sent >= FUZZ.max_examples  # the examples really ran (and reached the server)

    await in_thread(fuzzing(tally, targets, body))


# ------------------------------------------------------------------------------------------------------ raw bytes

GATEWAY_METHODS = [
    *methods_of(gateway_pb2, "GatewayService"),
    *methods_of(oip, "GRPCInferenceService"),
    *methods_of(management_pb2, "ManagementService"),
]
STREAM_METHODS = [*methods_streaming(gateway_pb2, "GatewayService"), *methods_streaming(oip, "GRPCInferenceService")]
STAGE_METHODS = {
    "tokenizer": methods_of(tokenizer_pb2, "TokenizerService"),
    "inference": [*methods_of(inference_pb2, "InferenceService"), *methods_of(management_pb2, "ManagementService")],
    "postprocess": methods_of(postprocess_pb2, "PostprocessService"),
}


def send_bytes(tally: Tally, channel: grpc.Channel, method: str, payload: bytes, streaming: bool) -> None:
    if streaming:
        stream = channel.stream_stream(method)

        def call() -> None:
            list(stream(iter([payload, payload]), timeout=TIMEOUT_S))

    else:
        unary = channel.unary_unary(method)

        def call() -> None:
            unary(payload, timeout=TIMEOUT_S)

    code, details = tally.send(call)
    # A request that does not parse is INVALID_ARGUMENT; one that does gets whatever its content deserves
    # (NOT_FOUND, UNIMPLEMENTED...), but never a failure of ours.
    assert code not in OUR_FAULTS, (method, payload, details)


async def test_random_bytes_to_every_gateway_rpc(targets: Targets, tally: Tally) -> None:
    def body(channels: dict[str, grpc.Channel]) -> None:
        @FUZZ
        @given(call=calls(GATEWAY_METHODS, STREAM_METHODS))
        def check(call: tuple[str, bytes]) -> None:
            method, payload = call
            send_bytes(tally, channels["gateway"], method, payload, method in STREAM_METHODS)

        check()
        assert tally.sent >= FUZZ.max_examples

    await in_thread(fuzzing(tally, targets, body))


@pytest.mark.parametrize("stage", sorted(STAGE_METHODS))
async def test_random_bytes_to_every_stage_rpc(targets: Targets, tally: Tally, stage: str) -> None:
    """The stages face only the gateway, but a broken or hostile peer on their network must not bring them down."""

    def body(channels: dict[str, grpc.Channel]) -> None:
        @FUZZ
        @given(call=calls(STAGE_METHODS[stage]))
        def check(call: tuple[str, bytes]) -> None:
            send_bytes(tally, channels[stage], *call, streaming=False)

        check()
        assert tally.sent >= FUZZ.max_examples

    await in_thread(fuzzing(tally, targets, body))


# -------------------------------------------------------------------------------------------------------- tensors

_NUMPY = {1: np.float32, 2: np.float16, 3: np.int64, 4: np.int32, 5: np.uint8}


@st.composite
def tensors(draw: st.DrawFn, dtype: int | None = None) -> tensor_pb2.Tensor:
    """A tensor whose dtype, shape and data agree or not; values from sensible to extreme (NaN, huge, negative)."""
    dtype = dtype if dtype is not None and draw(st.integers(0, 4)) else draw(st.sampled_from([0, 1, 2, 3, 4, 5, 17]))
    shape = draw(st.lists(st.one_of(st.integers(0, 6), st.sampled_from([-1, 2**40, 2**62])), max_size=4))
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    if dtype in _NUMPY and 0 <= count <= 512 and draw(st.integers(0, 3)):
        kind = np.dtype(_NUMPY[dtype])
        if kind.kind == "f":
            values = draw(st.lists(st.floats(width=16 if kind.itemsize == 2 else 32), min_size=count, max_size=count))
        else:
            info = np.iinfo(kind)
            small = st.integers(max(-3, int(info.min)), 40)
            values = draw(
                st.lists(st.one_of(small, st.integers(int(info.min), int(info.max))), min_size=count, max_size=count)
            )
        data = np.array(values, dtype=kind).tobytes()
    else:
        data = draw(st.binary(max_size=64))
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)  # type: ignore[arg-type]


@st.composite
def token_batches(draw: st.DrawFn) -> tensor_pb2.TokenBatch:
    """Either a well-formed ragged batch with arbitrary ids and lengths (empty sequences too), or random tensors."""
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, 12), min_size=0, max_size=4))
        total = sum(lengths)
        ids = draw(
            st.lists(
                st.one_of(st.integers(-3, 1_200), st.integers(-(2**63), 2**63 - 1)), min_size=total, max_size=total
            )
        )
        cu = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        batch = tensor_pb2.TokenBatch(
            input_ids=tensor_pb2.Tensor(dtype=3, shape=[total], data=np.array(ids, dtype=np.int64).tobytes()),
            cu_seqlens=tensor_pb2.Tensor(dtype=4, shape=[len(cu)], data=cu.tobytes()),
        )
        if draw(st.booleans()):
            types = draw(st.lists(st.integers(-1, 3), min_size=total, max_size=total))
            batch.token_type_ids.CopyFrom(
                tensor_pb2.Tensor(dtype=3, shape=[total], data=np.array(types, dtype=np.int64).tobytes())
            )
        return batch
    batch = tensor_pb2.TokenBatch()
    for name, dtype in (
        ("input_ids", 3),
        ("cu_seqlens", 4),
        ("token_type_ids", 3),
        ("offsets", 4),
        ("special_tokens_mask", 5),
    ):
        if draw(st.booleans()):
            getattr(batch, name).CopyFrom(draw(tensors(dtype)))
    return batch


async def test_random_token_batches_to_the_inference_stage(targets: Targets, tally: Tally) -> None:
    def body(channels: dict[str, grpc.Channel]) -> None:
        stub = inference_pb2_grpc.InferenceServiceStub(channels["inference"])

        @FUZZ
        @given(model=st.sampled_from(["tiny-embed", "tiny-rerank", "tiny-ner"]), batch=token_batches())
        def check(model: str, batch: tensor_pb2.TokenBatch) -> None:
            request = inference_pb2.InferRequest(model=model, batch=batch)
            code, details = tally.send(lambda: stub.Infer(request, timeout=TIMEOUT_S))
            assert code in CLIENT_FAULTS, (code, details, request)

        check()
        assert tally.sent >= FUZZ.max_examples

    await in_thread(fuzzing(tally, targets, body))


async def test_random_tensors_to_the_postprocess_stage(targets: Targets, tally: Tally) -> None:
    def body(channels: dict[str, grpc.Channel]) -> None:
        stub = postprocess_pb2_grpc.PostprocessServiceStub(channels["postprocess"])

        @FUZZ
        @given(
            rpc=st.integers(0, 3),
            values=tensors(1),
            batch=token_batches(),
            number=st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 5),
            text=st.lists(weird, max_size=3),
        )
        def check(
            rpc: int, values: tensor_pb2.Tensor, batch: tensor_pb2.TokenBatch, number: int, text: list[str]
        ) -> None:
            P = postprocess_pb2  # noqa: N806
            calls = [
                lambda: stub.Pool(
                    P.PoolRequest(
                        model="tiny-embed",
                        token_embeddings=values,
                        cu_seqlens=batch.cu_seqlens,
                        normalize=number % 2 == 0,
                    ),
                    timeout=TIMEOUT_S,
                ),
                lambda: stub.Classify(
                    P.ClassifyRequest(model="tiny-sentiment", logits=values, top_k=number), timeout=TIMEOUT_S
                ),
                lambda: stub.Rerank(
                    P.RerankRequest(model="tiny-rerank", logits=values, top_n=number), timeout=TIMEOUT_S
                ),
                lambda: stub.ClassifyTokens(
                    P.ClassifyTokensRequest(model="tiny-ner", logits=values, batch=batch, texts=text), timeout=TIMEOUT_S
                ),
            ]
            code, details = tally.send(calls[rpc])
            assert code in CLIENT_FAULTS, (code, details, rpc, values, batch, number)

        check()
        assert tally.sent >= FUZZ.max_examples

    await in_thread(fuzzing(tally, targets, body))


# ----------------------------------------------------------------------------------------- targeted hostile input

# (service, method, request, codes it may get, field a refusal must name or None)
Case = tuple[str, str, Message, set[grpc.StatusCode], str | None]
INVALID = {grpc.StatusCode.INVALID_ARGUMENT}
HUGE = 100_000


def check_cases(tally: Tally, channels: dict[str, grpc.Channel], cases: list[Case]) -> None:
    failures = []
    for service, method, request, allowed, field_name in cases:
        unary = channels[service].unary_unary(method, request_serializer=lambda m: m.SerializeToString())
        error: list[grpc.RpcError] = []

        def call(unary: Any = unary, request: Message = request, error: list[grpc.RpcError] = error) -> None:
            try:
                unary(request, timeout=TIMEOUT_S)
            except grpc.RpcError as err:
                error.append(err)
                raise

        code, details = tally.send(call)
        fields = details_of(error[0]).fields if error else []
        if code not in allowed or (field_name is not None and code != grpc.StatusCode.OK and field_name not in fields):
            failures.append((service, method, code, details[:200], fields))
    assert not failures, failures


async def test_huge_repeated_fields_are_refused_not_internal(targets: Targets, tally: Tally) -> None:
    """100k texts, ids or sequences in one message: INVALID_ARGUMENT naming the field, at every service."""
    empty = [""] * HUGE
    oip_huge = oip.ModelInferRequest(
        model_name="tiny-embed",
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="text",
                datatype="BYTES",
                shape=[HUGE],
                contents=oip.InferTensorContents(bytes_contents=[b""] * HUGE),
            )
        ],
    )
    gateway = gateway_pb2
    cases: list[Case] = [
        (
            "gateway",
            path(gateway, "GatewayService", "Embed"),
            gateway.EmbedRequest(model="tiny-embed", inputs=empty),
            INVALID,
            "inputs",
        ),
        (
            "gateway",
            path(gateway, "GatewayService", "Tokenize"),
            gateway.TokenizeRequest(model="tiny-embed", inputs=empty),
            INVALID,
            "inputs",
        ),
        (
            "gateway",
            path(gateway, "GatewayService", "Rerank"),
            gateway.RerankRequest(model="tiny-rerank", query="q", documents=empty),
            INVALID,
            "documents",
        ),
        (
            "gateway",
            path(gateway, "GatewayService", "Detokenize"),
            gateway.DetokenizeRequest(model="tiny-embed", ids=[2**62] * HUGE),
            INVALID,
            "ids",
        ),
        ("gateway", path(oip, "GRPCInferenceService", "ModelInfer"), oip_huge, INVALID, "inputs[text]"),
        (
            "tokenizer",
            path(tokenizer_pb2, "TokenizerService", "Tokenize"),
            tokenizer_pb2.TokenizeRequest(model="tiny-embed", texts=empty),
            INVALID,
            "inputs",
        ),
        (
            "tokenizer",
            path(tokenizer_pb2, "TokenizerService", "Tokenize"),
            tokenizer_pb2.TokenizeRequest(model="tiny-rerank", texts=["q"], text_pairs=empty),
            INVALID,
            "text_pairs",
        ),
        (
            "tokenizer",
            path(tokenizer_pb2, "TokenizerService", "Detokenize"),
            tokenizer_pb2.DetokenizeRequest(model="tiny-embed", ids=[2**62] * HUGE),
            INVALID,
            "ids",
        ),
        (
            "tokenizer",
            path(tokenizer_pb2, "TokenizerService", "Detokenize"),
            tokenizer_pb2.DetokenizeRequest(model="tiny-embed", ids=[-1] * HUGE),
            INVALID,
            "ids",
        ),
        (
            "inference",
            path(inference_pb2, "InferenceService", "Infer"),
            inference_pb2.InferRequest(
                model="tiny-embed",
                batch=tensor_pb2.TokenBatch(
                    input_ids=ids_tensor([]), cu_seqlens=ids_tensor([0] * HUGE, tensor_pb2.DATA_TYPE_INT32)
                ),
            ),
            INVALID,
            "batch.cu_seqlens",
        ),
        (
            "inference",
            path(inference_pb2, "InferenceService", "Infer"),
            inference_pb2.InferRequest(
                model="tiny-embed",
                batch=tensor_pb2.TokenBatch(input_ids=ids_tensor([2] * HUGE), cu_seqlens=ragged([1] * HUGE)),
            ),
            INVALID,
            "batch.cu_seqlens",
        ),
        (
            "inference",
            path(inference_pb2, "InferenceService", "Infer"),
            inference_pb2.InferRequest(
                model="tiny-embed",
                batch=tensor_pb2.TokenBatch(input_ids=ids_tensor([2] * HUGE), cu_seqlens=ragged([HUGE])),
            ),
            INVALID,
            "batch.cu_seqlens",
        ),
        (
            "postprocess",
            path(postprocess_pb2, "PostprocessService", "Pool"),
            postprocess_pb2.PoolRequest(
                model="tiny-embed",
                token_embeddings=REFERENCE_EMBEDDINGS,
                cu_seqlens=ids_tensor([0] * HUGE, tensor_pb2.DATA_TYPE_INT32),
            ),
            INVALID,
            "cu_seqlens",
        ),
        (
            "postprocess",
            path(postprocess_pb2, "PostprocessService", "ClassifyTokens"),
            postprocess_pb2.ClassifyTokensRequest(
                model="tiny-ner", logits=float_tensor(np.zeros((7, 5))), batch=NER_BATCH, texts=empty
            ),
            INVALID,
            "texts",
        ),
    ]
    await in_thread(fuzzing(tally, targets, lambda channels: check_cases(tally, channels, cases)))


BAD_UTF8 = b"ok\xc3\x28\xff"  # a lead byte without its continuation, and a byte no UTF-8 text holds


def with_bad_utf8(message: Message, field_name: str) -> bytes:
    """`message` serialized with one more occurrence of the string field `field_name`, holding invalid UTF-8.

    Python's protobuf refuses to build such a message, so the field is written by hand: tag, length, bytes.
    """
    number = message.DESCRIPTOR.fields_by_name[field_name].number
    assert number < 16  # a one-byte tag
    return message.SerializeToString() + bytes([(number << 3) | 2, len(BAD_UTF8)]) + BAD_UTF8


async def test_invalid_utf8_in_any_string_is_invalid_argument(targets: Targets, tally: Tally) -> None:
    cases = [
        (
            "gateway",
            path(gateway_pb2, "GatewayService", "Embed"),
            gateway_pb2.EmbedRequest(model="tiny-embed"),
            "inputs",
        ),
        ("gateway", path(gateway_pb2, "GatewayService", "Embed"), gateway_pb2.EmbedRequest(inputs=["a"]), "model"),
        (
            "gateway",
            path(gateway_pb2, "GatewayService", "Rerank"),
            gateway_pb2.RerankRequest(model="tiny-rerank"),
            "query",
        ),
        (
            "gateway",
            path(gateway_pb2, "GatewayService", "EmbedStream"),
            gateway_pb2.EmbedStreamRequest(request=gateway_pb2.EmbedRequest(model="tiny-embed")),
            "id",
        ),
        ("gateway", path(oip, "GRPCInferenceService", "ModelInfer"), oip.ModelInferRequest(), "model_name"),
        (
            "gateway",
            path(management_pb2, "ManagementService", "SetAlias"),
            management_pb2.SetAliasRequest(name="x"),
            "alias",
        ),
        (
            "tokenizer",
            path(tokenizer_pb2, "TokenizerService", "Tokenize"),
            tokenizer_pb2.TokenizeRequest(model="tiny-embed"),
            "texts",
        ),
        (
            "tokenizer",
            path(tokenizer_pb2, "TokenizerService", "Tokenize"),
            tokenizer_pb2.TokenizeRequest(texts=["a"]),
            "text_pairs",
        ),
        (
            "tokenizer",
            path(tokenizer_pb2, "TokenizerService", "Detokenize"),
            tokenizer_pb2.DetokenizeRequest(ids=[2]),
            "model",
        ),
        (
            "inference",
            path(inference_pb2, "InferenceService", "Infer"),
            inference_pb2.InferRequest(batch=REFERENCE_BATCH),
            "model",
        ),
        (
            "inference",
            path(inference_pb2, "InferenceService", "Infer"),
            inference_pb2.InferRequest(model="tiny-embed"),
            "tokenizer_fingerprint",
        ),
        (
            "inference",
            path(management_pb2, "ManagementService", "LoadModel"),
            management_pb2.LoadModelRequest(),
            "name",
        ),
        (
            "postprocess",
            path(postprocess_pb2, "PostprocessService", "ClassifyTokens"),
            postprocess_pb2.ClassifyTokensRequest(model="tiny-ner"),
            "texts",
        ),
        ("postprocess", path(postprocess_pb2, "PostprocessService", "Pool"), postprocess_pb2.PoolRequest(), "model"),
    ]

    def body(channels: dict[str, grpc.Channel]) -> None:
        failures = []
        for service, method, message, field_name in cases:
            raw = with_bad_utf8(message, field_name)
            streaming = method in STREAM_METHODS
            error: list[grpc.RpcError] = []

            def call(
                channel: grpc.Channel = channels[service],
                method: str = method,
                raw: bytes = raw,
                streaming: bool = streaming,
                error: list[grpc.RpcError] = error,
            ) -> None:
                try:
                    if streaming:
                        list(channel.stream_stream(method)(iter([raw]), timeout=TIMEOUT_S))
                    else:
                        channel.unary_unary(method)(raw, timeout=TIMEOUT_S)
                except grpc.RpcError as err:
                    error.append(err)
                    raise

            code, details = tally.send(call)
            fields = details_of(error[0]).fields if error else []
            if code != grpc.StatusCode.INVALID_ARGUMENT or fields != ["request"] or "UTF-8" not in details:
                failures.append((service, method, field_name, code, details, fields))
        assert not failures, failures

    await in_thread(fuzzing(tally, targets, body))


NAN, INF = float("nan"), float("inf")


async def test_non_finite_tensors_to_postprocess_are_invalid_argument(targets: Targets, tally: Tally) -> None:
    P = postprocess_pb2  # noqa: N806
    Pool, Classify, Rerank, Tokens = (  # noqa: N806
        path(P, "PostprocessService", m) for m in ("Pool", "Classify", "Rerank", "ClassifyTokens")
    )
    cases: list[Case] = []
    for bad in (NAN, INF, -INF):
        embeddings = np.arange(192, dtype=np.float32).reshape(6, 32)
        embeddings[3, 1] = bad
        cases += [
            (
                "postprocess",
                Pool,
                P.PoolRequest(model="tiny-embed", token_embeddings=float_tensor(embeddings), cu_seqlens=ragged([2, 4])),
                INVALID,
                "token_embeddings",
            ),
            (
                "postprocess",
                Classify,
                P.ClassifyRequest(model="tiny-sentiment", logits=float_tensor([[0.0, bad, 1.0]])),
                INVALID,
                "logits",
            ),
            (
                "postprocess",
                Rerank,
                P.RerankRequest(model="tiny-rerank", logits=float_tensor([[1.0], [bad]])),
                INVALID,
                "logits",
            ),
            (
                "postprocess",
                Tokens,
                P.ClassifyTokensRequest(
                    model="tiny-ner", logits=float_tensor(np.full((7, 5), bad)), batch=NER_BATCH, texts=NER_TEXTS
                ),
                INVALID,
                "logits",
            ),
        ]
    half = np.array([[1.0, 65504.0, 0.0]], dtype=np.float16) * np.float16(2)  # overflows float16 to inf
    cases += [
        (
            "postprocess",
            Classify,
            P.ClassifyRequest(
                model="tiny-sentiment",
                logits=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT16, shape=[1, 3], data=half.tobytes()),
            ),
            INVALID,
            "logits",
        ),
        # Wrong dtypes and shapes.
        (
            "postprocess",
            Classify,
            P.ClassifyRequest(
                model="tiny-sentiment",
                logits=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_INT64, shape=[1, 3], data=bytes(24)),
            ),
            INVALID,
            "logits.dtype",
        ),
        (
            "postprocess",
            Classify,
            P.ClassifyRequest(model="tiny-sentiment", logits=float_tensor([0.5, 0.5, 0.5])),
            INVALID,
            "logits.shape",
        ),
        (
            "postprocess",
            Rerank,
            P.RerankRequest(model="tiny-rerank", logits=float_tensor(np.zeros((2, 2, 2)))),
            INVALID,
            "logits.shape",
        ),
        (
            "postprocess",
            Pool,
            P.PoolRequest(model="tiny-embed", token_embeddings=float_tensor(np.zeros(6)), cu_seqlens=ragged([6])),
            INVALID,
            "token_embeddings.shape",
        ),
        (
            "postprocess",
            Pool,
            P.PoolRequest(
                model="tiny-embed", token_embeddings=REFERENCE_EMBEDDINGS, cu_seqlens=float_tensor([0.0, 6.0])
            ),
            INVALID,
            "cu_seqlens.dtype",
        ),
    ]
    await in_thread(fuzzing(tally, targets, lambda channels: check_cases(tally, channels, cases)))


async def test_bad_token_ids_dtypes_and_shapes_to_inference_are_invalid_argument(
    targets: Targets, tally: Tally
) -> None:
    """Ids outside the vocabulary would index out of the embedding table: the stage refuses them before the model."""
    Infer = path(inference_pb2, "InferenceService", "Infer")  # noqa: N806

    def infer(model: str, **batch: tensor_pb2.Tensor) -> inference_pb2.InferRequest:
        return inference_pb2.InferRequest(model=model, batch=tensor_pb2.TokenBatch(**batch))

    cases: list[Case] = []
    for model in ("tiny-embed", "tiny-ner", "tiny-rerank"):
        for bad in (-1, -(2**63), 2**31, 2**62, 10**6):
            cases.append(
                (
                    "inference",
                    Infer,
                    infer(model, input_ids=ids_tensor([2, bad, 3]), cu_seqlens=ragged([3])),
                    INVALID,
                    "batch.input_ids",
                )
            )
        cases.append(
            (
                "inference",
                Infer,
                infer(model, input_ids=ids_tensor([2, -7], tensor_pb2.DATA_TYPE_INT32), cu_seqlens=ragged([2])),
                INVALID,
                "batch.input_ids",
            )
        )
        cases.append(
            (
                "inference",
                Infer,
                infer(
                    model, input_ids=ids_tensor([2, 3]), token_type_ids=ids_tensor([0, 2**40]), cu_seqlens=ragged([2])
                ),
                INVALID,
                "batch.token_type_ids",
            )
        )
    cases += [
        (
            "inference",
            Infer,
            infer("tiny-embed", input_ids=float_tensor([2.0, 3.0]), cu_seqlens=ragged([2])),
            INVALID,
            "batch.input_ids.dtype",
        ),
        (
            "inference",
            Infer,
            infer(
                "tiny-embed",
                input_ids=tensor_pb2.Tensor(
                    dtype=tensor_pb2.DATA_TYPE_INT64, shape=[1, 2], data=np.array([2, 3]).tobytes()
                ),
                cu_seqlens=ragged([2]),
            ),
            INVALID,
            "batch.input_ids.shape",
        ),
        (
            "inference",
            Infer,
            infer("tiny-embed", input_ids=ids_tensor([2, 3]), cu_seqlens=ragged([3])),
            INVALID,
            "batch.cu_seqlens",
        ),
        (
            "inference",
            Infer,
            infer(
                "tiny-embed",
                input_ids=ids_tensor([2, 3]),
                cu_seqlens=ids_tensor([0, 2, 1, 2], tensor_pb2.DATA_TYPE_INT32),
            ),
            INVALID,
            "batch.cu_seqlens",
        ),
        (
            "inference",
            Infer,
            infer("tiny-embed", input_ids=ids_tensor([2, 3]), cu_seqlens=ids_tensor([0, 2**40, 2])),
            INVALID,
            "batch.cu_seqlens",
        ),
        (
            "inference",
            Infer,
            infer(
                "tiny-embed",
                input_ids=ids_tensor([2, 3]),
                cu_seqlens=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_INT32, shape=[2], data=b"\x00" * 7),
            ),
            INVALID,
            "batch.cu_seqlens.data",
        ),
    ]
    await in_thread(fuzzing(tally, targets, lambda channels: check_cases(tally, channels, cases)))


async def test_a_request_that_does_not_parse_is_invalid_argument(gateway: Gateway) -> None:
    """Found by the fuzzing above: grpc answered UNKNOWN (unary) and the error table INTERNAL (streams)."""
    unary = gateway.channel.unary_unary("/tandem.gateway.v1.GatewayService/Embed")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(b"\x00")
    d = details_of(caught.value)
    assert (d.code, d.reason, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", ["request"])
    assert "tandem.gateway.v1.EmbedRequest" in d.message
    for method in STREAM_METHODS:
        stream = gateway.channel.stream_stream(method)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream(iter([b"\x00"])):
                pass
        d = details_of(caught.value)
        assert (d.code, d.reason, d.fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT", ["request"])
