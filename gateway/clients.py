"""Typed clients of the three stages: one long-lived channel each, deadlines from the caller, stage codes kept."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

import grpc
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.common import errors, timing, tracing
from services.common.errors import Reason
from services.common.logging import request_id
from services.common.multiplex import Multiplexer, StreamBrokenError
from services.common.server import REQUEST_ID_KEY
from services.common.tls import ChannelSecurity, secure_or_insecure_channel
from tandem.inference.v1 import inference_pb2, inference_pb2_grpc
from tandem.postprocess.v1 import postprocess_pb2, postprocess_pb2_grpc
from tandem.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

log = logging.getLogger(__name__)

Response = TypeVar("Response")
Stub = TypeVar("Stub")


# Stage calls have one retry layer, StageClient's (`_attempt`), and the channel has no retryPolicy: with both, their
# tries multiplied (up to 9 RPCs per stage call, 18 with a hedge). StageClient's is the one kept because gRPC's
# retryPolicy commits a call once response headers arrive, so it cannot retry one cut off mid-answer (a replica
# killed while sending), and a method config takes a retryPolicy or a hedgingPolicy, never both, while the gateway
# needs retries and hedging together (StageClient hedges a slow attempt with another, each with its own retries).
#
# The budget stays what the two layers gave together, 9 RPCs per attempt: round_robin keeps sending calls to a
# replica that is up but still loading its models (it answers UNAVAILABLE) until it is ready, and with concurrent
# callers the next tries of one call often land on it again; with 3, the rolling-restart fault test lost calls.
# Pauses grow as in gRPC's retry policy, with full jitter so that the tries of one call spread over the replicas.
MAX_TRIES = 9
BACKOFF_S, MAX_BACKOFF_S = 0.02, 0.2
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Client-side round-robin over every address the target resolves to; no retryPolicy (see SERVICE_CONFIG)."""
    return [
        ("grpc.service_config", SERVICE_CONFIG),
        # Only gRPC's transparent retries, which resend a call that never reached the stage's application (a stream
        # refused by a connection going away); they are no attempt of their own, since nothing ran.
        ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Stage links are internal and short: pinging every second finds a hung (not just dead) replica within
        # seconds, closes its connection and lets round_robin and the retries move its calls elsewhere.
        ("grpc.keepalive_time_ms", 1_000),
        ("grpc.keepalive_timeout_ms", 2_000),
        # gRPC core waits for a ping's ack this long (default 60 s, whatever keepalive_timeout says): without it, a
        # SIGSTOPped replica kept its connection, and the calls on it, until their deadline.
        ("grpc.http2.ping_timeout_ms", 2_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]


def stage_error(stage: str, exc: grpc.aio.AioRpcError) -> errors.TandemError:
    """The stage's own status when it sent one (code and details kept); otherwise what the channel saw."""
    status = rpc_status.from_call(exc)
    if status is not None:
        return errors.from_upstream(status)
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.deadline_exceeded(f"deadline exceeded waiting for the {stage} stage", stage=stage)
    if code == grpc.StatusCode.UNAVAILABLE:
        return errors.unavailable(
            f"the {stage} stage is unavailable: {exc.details()}", reason=Reason.STAGE_UNAVAILABLE, stage=stage
        )
    if code == grpc.StatusCode.CANCELLED:
        return errors.TandemError(f"call to the {stage} stage was cancelled", code=code)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # Without a status of the stage's own, this is gRPC refusing a message over --max-message-bytes on the hop
        # (a busy stage answers QUEUE_FULL with RetryInfo): retrying the same request cannot help.
        return errors.TandemError(
            f"a message to or from the {stage} stage is over the stage message size limit ({exc.details()}); send"
            " fewer or shorter inputs per request, or raise --max-message-bytes on the gateway and the stages",
            code=code,
            reason=Reason.MESSAGE_TOO_LARGE,
            metadata={"stage": stage},
        )
    return errors.TandemError(exc.details() or f"{stage} stage failed", code=code, reason=Reason.INTERNAL)


class _RetryableError(Exception):
    """A try that failed in a way another try may not: UNAVAILABLE, a stage's CANCELLED, a broken stream."""

    def __init__(self, error: errors.TandemError) -> None:
        super().__init__(error.message)
        self.error = error


class StageClient(Generic[Stub]):
    """A channel to one stage (any number of replicas behind the target) and the call discipline.

    A subclass names its stage and the stub to call it with.
    """

    # Stage timings that this stage reports in its x-tandem-timing trailer and that the gateway passes on to its
    # caller (the inference stage's queue and compute split, which the gateway cannot see).
    forwarded_timings: tuple[str, ...] = ()

    stage: str
    stub_type: Callable[[grpc.aio.Channel], Stub]

    def __init__(
        self,
        target: str,
        max_message_bytes: int,
        hedge_after_s: float = 0.0,
        *,
        security: ChannelSecurity | None = None,
    ) -> None:
        self.target = target
        # A hedge goes to another replica; behind a Unix socket there is one process, so none is sent (which also
        # spares every call the task and timer that racing two attempts takes).
        self.hedge_after_s = 0.0 if target.startswith("unix:") else hedge_after_s
        # TLS (or mTLS) when `security` is given; the health checks share the channel, so they are secured too.
        # A CLIENT span per attempt (hedges and retries each get one) carries `traceparent` to the stage.
        self.channel = secure_or_insecure_channel(
            target,
            channel_options(max_message_bytes),
            security,
            interceptors=tracing.client_interceptors() or None,
        )
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._stub = self.stub_type(self.channel)

    async def _attempt(self, rpc: Callable[..., Awaitable[Response]], request: Any, deadline: float) -> Response:
        """One logical attempt: up to MAX_TRIES RPCs, the next one (on the next replica) after UNAVAILABLE or
        CANCELLED, while time is left. The only retries of a stage call (see SERVICE_CONFIG); every stage RPC is
        idempotent.

        This covers what the channel's retry policy cannot: a call cut off after its response headers arrived (a
        replica that died while sending its answer), and one that failed CANCELLED (a replica draining past its
        grace period).
        """

        async def once(time_left: float) -> Response:
            call: Any = rpc(request, timeout=time_left, metadata=((REQUEST_ID_KEY, request_id.get()),))
            try:
                response: Response = await call
            except grpc.aio.AioRpcError as exc:
                raise self._failure(exc) from None
            if self.forwarded_timings and hasattr(call, "trailing_metadata"):
                self._forward_timings(await call.trailing_metadata())
            return response

        return await self._tries(once, deadline)

    def _failure(self, exc: grpc.aio.AioRpcError) -> Exception:
        """The stage's error, as a _RetryableError when another try may succeed: UNAVAILABLE, or CANCELLED, which here
        was the stage's doing (a replica draining past its grace period), not ours (ours arrives as CancelledError)."""
        error = stage_error(self.stage, exc)
        retryable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        return _RetryableError(error) if retryable else error

    async def _tries(self, once: Callable[[float], Awaitable[Response]], deadline: float) -> Response:
        """`once(time_left)` up to MAX_TRIES times, the next after it raised _RetryableError (on the next replica,
        after a jittered pause), while time is left; the last try's error is the call's."""
        for retry in range(MAX_TRIES):
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise errors.deadline_exceeded(
                    f"deadline exceeded before calling the {self.stage} stage", stage=self.stage
                )
            try:
                return await once(timeout)
            except _RetryableError as failed:
                if retry == MAX_TRIES - 1:
                    raise failed.error from None
            await asyncio.sleep(random.uniform(0, min(MAX_BACKOFF_S, BACKOFF_S * 2**retry)))
        raise AssertionError("unreachable")

    def _forward_timings(self, trailers: Any) -> None:
        for key, value in trailers or ():
            if key == timing.TIMING_KEY:
                text = value.decode() if isinstance(value, bytes) else str(value)
                for name, seconds in timing.parse_timings(text).items():
                    if name in self.forwarded_timings:
                        timing.add(name, seconds)

    async def call(
        self, rpc: Callable[..., Awaitable[Response]], request: Any, deadline: float, stage: str | None = None
    ) -> Response:
        """Calls with the caller's remaining time as timeout; fails DEADLINE_EXCEEDED when none is left.

        With hedging on, a call that has not answered after `hedge_after_s` gets a second attempt (round_robin
        sends it to the next replica) and the first success wins: a replica that hangs, rather than dies, then
        costs a delay instead of a failure. Retries cannot do this: they only follow a failure.

        `stage` names the call's share of the caller's x-tandem-timing trailer (tokenize, infer, postprocess).
        """
        if stage is None:
            return await self._hedged(lambda: self._attempt(rpc, request, deadline))
        with timing.stage(stage):
            return await self._hedged(lambda: self._attempt(rpc, request, deadline))

    async def _hedged(self, start: Callable[[], Awaitable[Response]]) -> Response:
        """`start()`, and with hedging on a second one if the first has not answered after hedge_after_s."""
        if self.hedge_after_s <= 0:
            return await start()
        first = asyncio.ensure_future(start())
        attempts: set[asyncio.Future[Response]] = {first}
        try:
            done, _ = await asyncio.wait(attempts, timeout=self.hedge_after_s)
            if not done:
                log.warning("no answer from the %s stage after %.1fs: hedging", self.stage, self.hedge_after_s)
                attempts.add(asyncio.ensure_future(start()))
            while True:
                done, attempts = await asyncio.wait(attempts, return_when=asyncio.FIRST_COMPLETED)
                for attempt in done:
                    # The first success wins; a failure counts only once no other attempt is left.
                    if attempt.exception() is None or not attempts:
                        return attempt.result()
        finally:
            for attempt in attempts:
                attempt.cancel()

    async def open_stream(self, rpc: Callable[..., Any], request: Any, deadline: float) -> tuple[Any, Any]:
        """Starts a server-streaming call and reads its first message: (the call, the first message, or None when the
        stream ended at once). Retried like unary calls (next replica after UNAVAILABLE) only up to the first message,
        since nothing was produced before it; a stream that breaks later fails with the stage's status."""

        async def once(time_left: float) -> tuple[Any, Any]:
            call = rpc(request, timeout=time_left, metadata=((REQUEST_ID_KEY, request_id.get()),))
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                raise self._failure(exc) from None
            except BaseException:
                call.cancel()
                raise
            return call, None if first is grpc.aio.EOF else first

        return await self._tries(once, deadline)

    def open_duplex(self, rpc: Callable[..., Any], deadline: float) -> Any:
        """Starts a bidirectional stream with the caller's remaining time as its timeout."""
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise errors.deadline_exceeded(f"deadline exceeded before calling the {self.stage} stage", stage=self.stage)
        return rpc(timeout=timeout, metadata=((REQUEST_ID_KEY, request_id.get()),))

    async def serving(self, timeout_s: float) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.debug("%s stage health check failed: %s", self.stage, exc.code())
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self.channel.close()


class TokenizerStage(Protocol):
    """What the gateway calls on the tokenizer stage: a TokenizerClient (a stage process) or a LocalTokenizer."""

    stage: str
    target: str

    async def tokenize(
        self, request: tokenizer_pb2.TokenizeRequest, deadline: float
    ) -> tokenizer_pb2.TokenizeResponse: ...

    async def detokenize(
        self, request: tokenizer_pb2.DetokenizeRequest, deadline: float
    ) -> tokenizer_pb2.DetokenizeResponse: ...

    async def encode_prompt(
        self, request: tokenizer_pb2.EncodePromptRequest, deadline: float
    ) -> tokenizer_pb2.EncodePromptResponse: ...

    async def serving(self, timeout_s: float) -> bool: ...

    async def close(self) -> None: ...


class PostprocessStage(Protocol):
    """What the gateway calls on the postprocess stage: a PostprocessClient (a stage process) or a LocalPostprocess."""

    stage: str
    target: str

    async def pool(self, request: postprocess_pb2.PoolRequest, deadline: float) -> postprocess_pb2.PoolResponse: ...

    async def classify(
        self, request: postprocess_pb2.ClassifyRequest, deadline: float
    ) -> postprocess_pb2.ClassifyResponse: ...

    async def classify_tokens(
        self, request: postprocess_pb2.ClassifyTokensRequest, deadline: float
    ) -> postprocess_pb2.ClassifyTokensResponse: ...

    async def rerank(
        self, request: postprocess_pb2.RerankRequest, deadline: float
    ) -> postprocess_pb2.RerankResponse: ...

    def detokenize(self, deadline: float) -> Any: ...

    async def serving(self, timeout_s: float) -> bool: ...

    async def close(self) -> None: ...


class TokenizerClient(StageClient["tokenizer_pb2_grpc.TokenizerServiceAsyncStub"]):
    stage = "tokenizer"
    stub_type = tokenizer_pb2_grpc.TokenizerServiceStub

    async def tokenize(self, request: tokenizer_pb2.TokenizeRequest, deadline: float) -> tokenizer_pb2.TokenizeResponse:
        return await self.call(self._stub.Tokenize, request, deadline, "tokenize")

    async def detokenize(
        self, request: tokenizer_pb2.DetokenizeRequest, deadline: float
    ) -> tokenizer_pb2.DetokenizeResponse:
        return await self.call(self._stub.Detokenize, request, deadline)

    async def encode_prompt(
        self, request: tokenizer_pb2.EncodePromptRequest, deadline: float
    ) -> tokenizer_pb2.EncodePromptResponse:
        return await self.call(self._stub.EncodePrompt, request, deadline, "tokenize")


def uses_inference_stream(setting: str, target: str) -> bool:
    """Whether Infer calls go multiplexed on an InferStream (GatewaySettings.inference_stream). Never while tracing:
    a call of its own gives each request its CLIENT span and carries its trace context to the stage."""
    if setting == "off" or tracing.enabled():
        return False
    return setting == "on" or target.startswith("unix:")


# The request id the multiplexed stream itself is opened (and its failures logged) under; each request carries its
# own in its message.
STREAM_REQUEST_ID = "inference-stream"


class InferenceClient(StageClient["inference_pb2_grpc.InferenceServiceAsyncStub"]):
    """With `stream`, Infer calls go multiplexed on one InferStream (services.common.multiplex) instead of a call
    each, with the same retries (the next try after UNAVAILABLE or a broken stream), hedging, deadline and codes."""

    forwarded_timings = ("queue", "compute")
    stage = "inference"
    stub_type = inference_pb2_grpc.InferenceServiceStub

    def __init__(
        self,
        target: str,
        max_message_bytes: int,
        hedge_after_s: float = 0.0,
        *,
        security: ChannelSecurity | None = None,
        stream: bool = False,
    ) -> None:
        super().__init__(target, max_message_bytes, hedge_after_s, security=security)
        self._mux: Multiplexer[tuple[inference_pb2.InferRequest, float], inference_pb2.InferStreamResponse] | None = (
            Multiplexer(self._open_stream, _stream_request, _stream_cancel, _answer_id) if stream else None
        )

    @property
    def streamed(self) -> bool:
        return self._mux is not None

    @property
    def multiplexer(self) -> Multiplexer[tuple[inference_pb2.InferRequest, float], inference_pb2.InferStreamResponse]:
        """The stream's caller side (only when streamed)."""
        assert self._mux is not None
        return self._mux

    def _open_stream(self) -> Any:
        request_id.set(STREAM_REQUEST_ID)  # in the stream's own context (Multiplexer), never a caller's
        return self._stub.InferStream(metadata=((REQUEST_ID_KEY, STREAM_REQUEST_ID),))

    async def infer(self, request: inference_pb2.InferRequest, deadline: float) -> inference_pb2.InferResponse:
        mux = self._mux
        if mux is None:
            return await self.call(self._stub.Infer, request, deadline, "infer")
        with timing.stage("infer"):
            return await self._hedged(lambda: self._infer_streamed(mux, request, deadline))

    async def _infer_streamed(
        self,
        mux: Multiplexer[tuple[inference_pb2.InferRequest, float], inference_pb2.InferStreamResponse],
        request: inference_pb2.InferRequest,
        deadline: float,
    ) -> inference_pb2.InferResponse:
        """_attempt's discipline over the stream: up to MAX_TRIES, the next after UNAVAILABLE or a broken stream."""

        async def once(time_left: float) -> inference_pb2.InferResponse:
            try:
                async with asyncio.timeout(time_left):
                    answer = await mux.call((request, time_left))
            except TimeoutError:
                raise errors.deadline_exceeded(
                    f"deadline exceeded waiting for the {self.stage} stage", stage=self.stage
                ) from None
            except StreamBrokenError as broken:
                raise _RetryableError(
                    errors.unavailable(
                        f"the {self.stage} stage is unavailable: {broken}",
                        reason=Reason.STAGE_UNAVAILABLE,
                        stage=self.stage,
                    )
                ) from None
            for name, seconds in answer.timings.items():
                if name in self.forwarded_timings:
                    timing.add(name, seconds)
            if answer.HasField("response"):
                return answer.response
            error = errors.from_upstream(status_pb2.Status.FromString(answer.status))
            raise _RetryableError(error) if error.code == grpc.StatusCode.UNAVAILABLE else error

        return await self._tries(once, deadline)

    async def close(self) -> None:
        if self._mux is not None:
            await self._mux.close()
        await super().close()

    async def list_models(self, deadline: float) -> inference_pb2.ListModelsResponse:
        return await self.call(self._stub.ListModels, inference_pb2.ListModelsRequest(), deadline)

    async def get_model(self, model: str, deadline: float) -> inference_pb2.GetModelResponse:
        return await self.call(self._stub.GetModel, inference_pb2.GetModelRequest(model=model), deadline)

    async def generate(
        self, request: inference_pb2.GenerateRequest, deadline: float
    ) -> tuple[Any, inference_pb2.GenerateResponse | None]:
        """The Generate stream and its first message (the prompt is prefilled and admitted by then)."""
        return await self.open_stream(self._stub.Generate, request, deadline)


def _stream_request(id: int, message: tuple[inference_pb2.InferRequest, float]) -> inference_pb2.InferStreamRequest:
    request, timeout = message
    return inference_pb2.InferStreamRequest(
        id=id, request=request, timeout_seconds=timeout, request_id=request_id.get()
    )


def _stream_cancel(id: int) -> inference_pb2.InferStreamRequest:
    return inference_pb2.InferStreamRequest(id=id, cancel=True)


def _answer_id(answer: inference_pb2.InferStreamResponse) -> int:
    return answer.id


class PostprocessClient(StageClient["postprocess_pb2_grpc.PostprocessServiceAsyncStub"]):
    stage = "postprocess"
    stub_type = postprocess_pb2_grpc.PostprocessServiceStub

    async def pool(self, request: postprocess_pb2.PoolRequest, deadline: float) -> postprocess_pb2.PoolResponse:
        return await self.call(self._stub.Pool, request, deadline, "postprocess")

    async def classify(
        self, request: postprocess_pb2.ClassifyRequest, deadline: float
    ) -> postprocess_pb2.ClassifyResponse:
        return await self.call(self._stub.Classify, request, deadline, "postprocess")

    async def classify_tokens(
        self, request: postprocess_pb2.ClassifyTokensRequest, deadline: float
    ) -> postprocess_pb2.ClassifyTokensResponse:
        return await self.call(self._stub.ClassifyTokens, request, deadline, "postprocess")

    async def rerank(self, request: postprocess_pb2.RerankRequest, deadline: float) -> postprocess_pb2.RerankResponse:
        return await self.call(self._stub.Rerank, request, deadline, "postprocess")

    def detokenize(self, deadline: float) -> Any:
        """A Detokenize stream: write DetokenizeRequests, read one DetokenizeResponse per request."""
        return self.open_duplex(self._stub.Detokenize, deadline)
