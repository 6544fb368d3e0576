"""A typed Python client for Tandem's gateway: numpy embeddings, deadlines, retries that honour RetryInfo, rich errors.

    with TandemClient("127.0.0.1:50051") as client:
        vectors = client.embed(["A man plays guitar.", "Someone plays an instrument."])   # (2, 384) float32
        labels = client.classify(["great film"], model="my-sentiment", top_k=1)

A gateway served with TLS (mTLS): `TandemClient(target, credentials=tls_credentials("ca.pem", "client.pem",
"client-key.pem"))`. `AsyncTandemClient` has the same methods as coroutines, for asyncio code. Every failure raises
`TandemError`, which carries the gRPC code and the google.rpc details the server sent (ErrorInfo reason,
BadRequest fields, RetryInfo).
"""

# `timeout` is a gRPC deadline in seconds, named as grpc.aio names it, not an asyncio timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import grpc
import grpc.aio
import numpy as np
import numpy.typing as npt
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.model.v1 import model_pb2

__all__ = [
    "NO_RETRY",
    "AsyncTandemClient",
    "Entity",
    "FieldViolation",
    "Label",
    "ModelInfo",
    "RerankResult",
    "RetryPolicy",
    "StreamResult",
    "TandemClient",
    "TandemError",
    "TokenEncoding",
    "tls_credentials",
]

DEFAULT_TIMEOUT_S = 30.0
# The server accepts 64 MiB messages; a large embedding batch would otherwise hit gRPC's 4 MiB receive default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Only these mean "the same request may succeed later": the server is loading or overloaded, or unreachable.
# INVALID_ARGUMENT and NOT_FOUND would fail again; DEADLINE_EXCEEDED has used up the caller's time budget.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

Request = TypeVar("Request")
Response = TypeVar("Response")
Vectors = npt.NDArray[np.float32]


def tls_credentials(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """Credentials for a gateway served with TLS: `ca` verifies its certificate (None: the system's roots), and
    `cert` with `key` present a client certificate where the gateway requires one (mTLS).

        TandemClient("gw:50051", credentials=tls_credentials("ca.pem", "client.pem", "client-key.pem"))
    """
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(
        Path(ca).read_bytes() if ca is not None else None,
        Path(key).read_bytes() if key is not None else None,
        Path(cert).read_bytes() if cert is not None else None,
    )


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field, from google.rpc.BadRequest."""

    field: str
    description: str = ""


class TandemError(Exception):
    """A failed call: the gRPC code and message, plus the google.rpc details Tandem attaches to every error."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        domain: str | None = None,
        metadata: dict[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = metadata or {}
        self.field_violations = list(field_violations)
        self.retry_delay_s = retry_delay_s

    @property
    def fields(self) -> list[str]:
        """Names of the bad fields, such as ["inputs"] or ["inputs[1]"]."""
        return [v.field for v in self.field_violations]

    def __str__(self) -> str:
        reason = f" ({self.reason})" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    @classmethod
    def from_rpc_error(cls, rpc_error: grpc.RpcError) -> TandemError:
        """Reads code, message and the `grpc-status-details-bin` trailer of a failed call (sync or asyncio)."""
        call: grpc.Call = rpc_error  # type: ignore[assignment]  # every RpcError a channel raises is also a Call
        code, message = call.code(), call.details() or ""
        try:
            status = rpc_status.from_call(call)
        except ValueError:  # trailer disagrees with the status line: trust the status line
            status = None
        error = cls(code, message)
        # No status means no rich details (a proxy, or gRPC itself, failed the call): code and message only.
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                error.reason, error.domain, error.metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                error.field_violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                error.retry_delay_s = retry.retry_delay.ToNanoseconds() / 1e9
        return error

    @classmethod
    def from_stream_error(cls, error: gateway_pb2.StreamError) -> TandemError:
        """The error of one EmbedStream request, which travels in its response rather than in a trailer."""
        code = next((c for c in grpc.StatusCode if c.value[0] == error.code), grpc.StatusCode.UNKNOWN)
        return cls(
            code,
            error.message,
            reason=error.reason or None,
            field_violations=[FieldViolation(f) for f in error.fields],
        )


@dataclass(frozen=True)
class RetryPolicy:
    """Retries UNAVAILABLE and RESOURCE_EXHAUSTED, waiting as long as the server's RetryInfo asks, else backing off
    exponentially with full jitter (so that many clients that failed together do not come back together).

    gRPC's built-in retry policy (service config) is not used: it cannot read google.rpc.RetryInfo.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def delay_s(self, attempt: int, error: TandemError) -> float | None:
        """Seconds to wait after failed attempt number `attempt` (1-based), or None when not to retry."""
        if error.code not in RETRYABLE or attempt >= self.max_attempts:
            return None
        if error.retry_delay_s is not None:
            return error.retry_delay_s
        return random.uniform(0, min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1)))


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class Label:
    """A label and its score (softmax probability, or sigmoid for multi-label models)."""

    label: str
    score: float


@dataclass(frozen=True)
class Entity:
    """A tagged span; start and end (exclusive) count Unicode code points, like Python's str indices."""

    label: str
    score: float
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class RerankResult:
    """A document's index in the request, its relevance in [0, 1], and its text when asked for."""

    index: int
    score: float
    document: str = ""


@dataclass(frozen=True)
class TokenEncoding:
    """One tokenized input; offsets are (start, end) code-point spans, (0, 0) for special tokens."""

    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    special: list[bool]


@dataclass(frozen=True)
class ModelInfo:
    """A served model; task is "embedding", "classification", "token-classification" or "rerank"."""

    name: str
    task: str
    version: str
    versions: list[str]
    max_input_length: int
    embedding_dimension: int
    labels: list[str]
    ready: bool
    backend: str
    multi_label: bool


@dataclass(frozen=True)
class StreamResult:
    """The answer to one EmbedStream request: its id and either embeddings or the error of that request alone."""

    id: str
    embeddings: Vectors | None = None
    error: TandemError | None = None


# Requests and responses, shared by the sync and asyncio clients.


def _texts(inputs: Sequence[str], name: str = "inputs") -> list[str]:
    # A bare string is a Sequence[str] too, and would be embedded one character at a time.
    if isinstance(inputs, str):
        raise TypeError(f"{name} must be a sequence of strings, not a single string: wrap it in a list")
    return list(inputs)


def _embed_request(inputs: Sequence[str], model: str, normalize: bool, truncate: bool) -> gateway_pb2.EmbedRequest:
    return gateway_pb2.EmbedRequest(model=model, inputs=_texts(inputs), normalize=normalize, truncate=truncate)


def _vectors(response: gateway_pb2.EmbedResponse) -> Vectors:
    return np.array([e.values for e in response.embeddings], dtype=np.float32)


def _labels(response: gateway_pb2.ClassifyResponse) -> list[list[Label]]:
    return [[Label(s.label, s.score) for s in r.labels] for r in response.results]


def _entities(response: gateway_pb2.ClassifyTokensResponse) -> list[list[Entity]]:
    return [[Entity(e.label, e.score, e.start, e.end, e.text) for e in r.entities] for r in response.results]


def _ranked(response: gateway_pb2.RerankResponse) -> list[RerankResult]:
    return [RerankResult(r.index, r.score, r.document) for r in response.results]


def _encodings(response: gateway_pb2.TokenizeResponse) -> list[TokenEncoding]:
    return [
        TokenEncoding(list(e.ids), list(e.tokens), [(o.start, o.end) for o in e.offsets], list(e.special))
        for e in response.encodings
    ]


def _model_info(info: model_pb2.ModelInfo) -> ModelInfo:
    task = model_pb2.Task.Name(info.task).removeprefix("TASK_").lower().replace("_", "-")
    return ModelInfo(
        name=info.name,
        task=task,
        version=info.version,
        versions=list(info.versions),
        max_input_length=info.max_input_length,
        embedding_dimension=info.embedding_dimension,
        labels=list(info.labels),
        ready=info.ready,
        backend=info.backend,
        multi_label=info.multi_label,
    )


def _stream_requests(
    requests: Iterable[tuple[str, Sequence[str]]], model: str, normalize: bool, truncate: bool
) -> Iterator[gateway_pb2.EmbedStreamRequest]:
    for request_id, inputs in requests:
        yield gateway_pb2.EmbedStreamRequest(id=request_id, request=_embed_request(inputs, model, normalize, truncate))


def _stream_result(response: gateway_pb2.EmbedStreamResponse) -> StreamResult:
    if response.HasField("error"):
        return StreamResult(response.id, error=TandemError.from_stream_error(response.error))
    return StreamResult(response.id, embeddings=_vectors(response.response))


class TandemClient:
    """Blocking client for tandem.gateway.v1.GatewayService; use as a context manager, or call close().

    `timeout` is each call's deadline in seconds, retries and their waits included; a call's own `timeout=`
    overrides it. `retry=NO_RETRY` turns retries off. Pass `channel` to bring your own (interceptors, load
    balancing); the client then leaves closing it to you. `api_key` is sent as `x-api-key` with every call.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy = RetryPolicy(),  # frozen, so one shared default is safe
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
        api_key: str | None = None,
    ) -> None:
        if channel is not None and credentials is not None:
            raise ValueError("pass either a channel or credentials, not both")
        self._owns_channel = channel is None
        if channel is None:
            channel = (
                grpc.secure_channel(target, credentials, _CHANNEL_OPTIONS)
                if credentials is not None
                else grpc.insecure_channel(target, _CHANNEL_OPTIONS)
            )
        self.channel = channel
        self.stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        self.timeout = timeout
        self.retry = retry
        # Sent with every call; over an insecure channel the key travels in clear text, so use TLS beyond loopback.
        self.metadata: tuple[tuple[str, str], ...] | None = (("x-api-key", api_key),) if api_key else None

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        timeout: float | None,
    ) -> Response:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                # Each attempt gets what is left of the one deadline, so retries never stretch the caller's budget.
                return method(request, timeout=max(deadline - time.monotonic(), 0.0), metadata=self.metadata)
            except grpc.RpcError as rpc_error:
                error = TandemError.from_rpc_error(rpc_error)
                delay = self.retry.delay_s(attempt, error)
                if delay is None or time.monotonic() + delay >= deadline:
                    raise error from rpc_error
            time.sleep(delay)

    def embed(
        self,
        inputs: Sequence[str],
        *,
        model: str = "",
        normalize: bool = True,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> Vectors:
        """Embeddings as a float32 array of shape (len(inputs), dimension), in input order."""
        return _vectors(self._call(self.stub.Embed, _embed_request(inputs, model, normalize, truncate), timeout))

    def classify(
        self,
        inputs: Sequence[str],
        *,
        model: str = "",
        top_k: int = 0,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> list[list[Label]]:
        """Per input, its labels best first (top_k of them; 0 for all)."""
        request = gateway_pb2.ClassifyRequest(model=model, inputs=_texts(inputs), top_k=top_k, truncate=truncate)
        return _labels(self._call(self.stub.Classify, request, timeout))

    def classify_tokens(
        self, inputs: Sequence[str], *, model: str = "", truncate: bool = True, timeout: float | None = None
    ) -> list[list[Entity]]:
        """Per input, its entities in text order."""
        request = gateway_pb2.ClassifyTokensRequest(model=model, inputs=_texts(inputs), truncate=truncate)
        return _entities(self._call(self.stub.ClassifyTokens, request, timeout))

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        model: str = "",
        top_n: int = 0,
        return_documents: bool = False,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> list[RerankResult]:
        """Documents best first (top_n of them; 0 for all)."""
        request = gateway_pb2.RerankRequest(
            model=model,
            query=query,
            documents=_texts(documents, "documents"),
            top_n=top_n,
            return_documents=return_documents,
            truncate=truncate,
        )
        return _ranked(self._call(self.stub.Rerank, request, timeout))

    def tokenize(
        self,
        inputs: Sequence[str],
        *,
        model: str = "",
        add_special_tokens: bool = True,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> list[TokenEncoding]:
        request = gateway_pb2.TokenizeRequest(
            model=model, inputs=_texts(inputs), add_special_tokens=add_special_tokens, truncate=truncate
        )
        return _encodings(self._call(self.stub.Tokenize, request, timeout))

    def detokenize(
        self, ids: Sequence[int], *, model: str = "", skip_special_tokens: bool = True, timeout: float | None = None
    ) -> str:
        request = gateway_pb2.DetokenizeRequest(model=model, ids=list(ids), skip_special_tokens=skip_special_tokens)
        return self._call(self.stub.Detokenize, request, timeout).text

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = self._call(self.stub.ListModels, gateway_pb2.ListModelsRequest(), timeout)
        return [_model_info(m) for m in reply.models]

    def get_model(self, model: str = "", *, timeout: float | None = None) -> ModelInfo:
        reply = self._call(self.stub.GetModel, gateway_pb2.GetModelRequest(model=model), timeout)
        return _model_info(reply.model)

    def embed_stream(
        self,
        requests: Iterable[tuple[str, Sequence[str]]],
        *,
        model: str = "",
        normalize: bool = True,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> Iterator[StreamResult]:
        """Embeds (id, inputs) pairs over one EmbedStream and yields a result per request, in request order.

        A failed request yields a result with `error` set and the stream goes on; a failure of the stream itself
        raises TandemError. Streams are not retried (responses already yielded cannot be taken back), and
        `timeout` bounds the whole stream (default: none, as a stream may run for as long as it is fed).
        """
        call = self.stub.EmbedStream(
            _stream_requests(requests, model, normalize, truncate), timeout=timeout, metadata=self.metadata
        )
        try:
            for response in call:
                yield _stream_result(response)
        except grpc.RpcError as rpc_error:
            raise TandemError.from_rpc_error(rpc_error) from rpc_error
        finally:
            call.cancel()  # no-op after a full read; stops the call when the caller leaves the loop early


class AsyncTandemClient:
    """The asyncio twin of TandemClient: the same methods as coroutines; use with `async with`, or await close()."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy = RetryPolicy(),  # frozen, so one shared default is safe
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.aio.Channel | None = None,
        api_key: str | None = None,
    ) -> None:
        if channel is not None and credentials is not None:
            raise ValueError("pass either a channel or credentials, not both")
        self._owns_channel = channel is None
        if channel is None:
            channel = (
                grpc.aio.secure_channel(target, credentials, _CHANNEL_OPTIONS)
                if credentials is not None
                else grpc.aio.insecure_channel(target, _CHANNEL_OPTIONS)
            )
        self.channel = channel
        self.stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        self.timeout = timeout
        self.retry = retry
        # Sent with every call; over an insecure channel the key travels in clear text, so use TLS beyond loopback.
        self.metadata: tuple[tuple[str, str], ...] | None = (("x-api-key", api_key),) if api_key else None

    async def close(self) -> None:
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        timeout: float | None,
    ) -> Response:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(request, timeout=max(deadline - time.monotonic(), 0.0), metadata=self.metadata)
            except grpc.RpcError as rpc_error:
                error = TandemError.from_rpc_error(rpc_error)
                delay = self.retry.delay_s(attempt, error)
                if delay is None or time.monotonic() + delay >= deadline:
                    raise error from rpc_error
            await asyncio.sleep(delay)

    async def embed(
        self,
        inputs: Sequence[str],
        *,
        model: str = "",
        normalize: bool = True,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> Vectors:
        """Embeddings as a float32 array of shape (len(inputs), dimension), in input order."""
        reply = await self._call(self.stub.Embed, _embed_request(inputs, model, normalize, truncate), timeout)
        return _vectors(reply)

    async def classify(
        self,
        inputs: Sequence[str],
        *,
        model: str = "",
        top_k: int = 0,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> list[list[Label]]:
        request = gateway_pb2.ClassifyRequest(model=model, inputs=_texts(inputs), top_k=top_k, truncate=truncate)
        return _labels(await self._call(self.stub.Classify, request, timeout))

    async def classify_tokens(
        self, inputs: Sequence[str], *, model: str = "", truncate: bool = True, timeout: float | None = None
    ) -> list[list[Entity]]:
        request = gateway_pb2.ClassifyTokensRequest(model=model, inputs=_texts(inputs), truncate=truncate)
        return _entities(await self._call(self.stub.ClassifyTokens, request, timeout))

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        model: str = "",
        top_n: int = 0,
        return_documents: bool = False,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> list[RerankResult]:
        request = gateway_pb2.RerankRequest(
            model=model,
            query=query,
            documents=_texts(documents, "documents"),
            top_n=top_n,
            return_documents=return_documents,
            truncate=truncate,
        )
        return _ranked(await self._call(self.stub.Rerank, request, timeout))

    async def tokenize(
        self,
        inputs: Sequence[str],
        *,
        model: str = "",
        add_special_tokens: bool = True,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> list[TokenEncoding]:
        request = gateway_pb2.TokenizeRequest(
            model=model, inputs=_texts(inputs), add_special_tokens=add_special_tokens, truncate=truncate
        )
        return _encodings(await self._call(self.stub.Tokenize, request, timeout))

    async def detokenize(
        self, ids: Sequence[int], *, model: str = "", skip_special_tokens: bool = True, timeout: float | None = None
    ) -> str:
        request = gateway_pb2.DetokenizeRequest(model=model, ids=list(ids), skip_special_tokens=skip_special_tokens)
        return (await self._call(self.stub.Detokenize, request, timeout)).text

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = await self._call(self.stub.ListModels, gateway_pb2.ListModelsRequest(), timeout)
        return [_model_info(m) for m in reply.models]

    async def get_model(self, model: str = "", *, timeout: float | None = None) -> ModelInfo:
        reply = await self._call(self.stub.GetModel, gateway_pb2.GetModelRequest(model=model), timeout)
        return _model_info(reply.model)

    async def embed_stream(
        self,
        requests: Iterable[tuple[str, Sequence[str]]] | AsyncIterable[tuple[str, Sequence[str]]],
        *,
        model: str = "",
        normalize: bool = True,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamResult]:
        """As TandemClient.embed_stream; `requests` may also be an async iterable, fed while responses arrive."""

        async def produce() -> AsyncIterator[gateway_pb2.EmbedStreamRequest]:
            if isinstance(requests, AsyncIterable):
                async for request_id, inputs in requests:
                    yield gateway_pb2.EmbedStreamRequest(
                        id=request_id, request=_embed_request(inputs, model, normalize, truncate)
                    )
            else:
                for request in _stream_requests(requests, model, normalize, truncate):
                    yield request

        call = self.stub.EmbedStream(produce(), timeout=timeout, metadata=self.metadata)
        try:
            async for response in call:
                yield _stream_result(response)
        except grpc.RpcError as rpc_error:
            raise TandemError.from_rpc_error(rpc_error) from rpc_error
        finally:
            call.cancel()
