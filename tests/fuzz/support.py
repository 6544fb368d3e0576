"""What the fuzz tests share: Hypothesis settings, the tally of messages and codes each test reports, seed requests
per method and the mutations of them, normal requests whose answers must not change, and the checks of answers.

Every answer must be a documented status code (never UNKNOWN or INTERNAL), no server goes down, and a normal request
right after the fuzzing returns the same result as before it. Each fuzz test tallies the messages it sent and the
codes it got: printed on one line (visible with `-s`) and, when TANDEM_FUZZ_REPORT names a file, appended to it as one
JSON line per test.

Hypothesis drives blocking gRPC channels from a worker thread while the in-process servers run on the test's event
loop. The examples are bounded so that the folder stays well under a minute and a half once the stack is up.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.inference.v1 import inference_pb2, inference_pb2_grpc
from tandem.management.v1 import management_pb2
from tandem.oip.v2 import grpc_service_pb2 as oip
from tandem.postprocess.v1 import postprocess_pb2, postprocess_pb2_grpc
from tandem.tensor.v1 import tensor_pb2
from tandem.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
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
            code: grpc.StatusCode = err.code()
            details = err.details() or ""
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


def ids_tensor(ids: list[int], dtype: tensor_pb2.DataType.ValueType = tensor_pb2.DATA_TYPE_INT64) -> tensor_pb2.Tensor:
    kind = np.int64 if dtype == tensor_pb2.DATA_TYPE_INT64 else np.int32
    return tensor_pb2.Tensor(dtype=dtype, shape=[len(ids)], data=np.array(ids, dtype=kind).tobytes())


def float_tensor(values: Any) -> tensor_pb2.Tensor:
    array = np.asarray(values, dtype=np.float32)
    return tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=array.shape, data=array.tobytes())


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


def calls(methods: Sequence[str], streams: Sequence[str] = ()) -> st.SearchStrategy[tuple[str, bytes]]:
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
        stream: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(method)

        def call() -> None:
            list(stream(iter([payload, payload]), timeout=TIMEOUT_S))

    else:
        unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)

        def call() -> None:
            unary(payload, timeout=TIMEOUT_S)

    code, details = tally.send(call)
    # A request that does not parse is INVALID_ARGUMENT; one that does gets whatever its content deserves
    # (NOT_FOUND, UNIMPLEMENTED...), but never a failure of ours.
    assert code not in OUR_FAULTS, (method, payload, details)


# --------------------------------------------------------------------------------------------- targeted cases

# (service, method, request, codes it may get, field a refusal must name or None)
Case = tuple[str, str, Message, set[grpc.StatusCode], str | None]
INVALID = {grpc.StatusCode.INVALID_ARGUMENT}
HUGE = 100_000


def check_cases(tally: Tally, channels: dict[str, grpc.Channel], cases: list[Case]) -> None:
    failures = []
    for service, method, request, allowed, field_name in cases:
        unary: grpc.UnaryUnaryMultiCallable[Message, bytes] = channels[service].unary_unary(
            method, request_serializer=lambda m: m.SerializeToString()
        )
        error: list[grpc.RpcError] = []

        def call(
            unary: grpc.UnaryUnaryMultiCallable[Message, bytes] = unary,
            request: Message = request,
            error: list[grpc.RpcError] = error,
        ) -> None:
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
