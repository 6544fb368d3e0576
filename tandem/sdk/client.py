"""The blocking client for Tandem's gateway: the twin of AsyncTandemClient (tandem/sdk/aio.py) for code without an
event loop.

    with TandemClient("127.0.0.1:50051") as client:
        vectors = client.embed(["A man plays guitar.", "Someone plays an instrument."])   # (2, 384) float32
        labels = client.classify(["great film"], model="my-sentiment", top_k=1)
        for delta in client.generate("Once upon a time", model="my-llm", max_new_tokens=64):
            print(delta.text, end="", flush=True)

A gateway served with TLS (mTLS): `TandemClient(target, credentials=tls_credentials("ca.pem", "client.pem",
"client-key.pem"))`. Every failure raises `TandemError`, which carries the gRPC code and the google.rpc details the
server sent (ErrorInfo reason, BadRequest fields, RetryInfo).

Both clients build their requests and read their results with tandem/sdk/converters.py and retry with
tandem/sdk/retry.py, so each is only its transport. This one is not a wrapper that runs the asyncio client on an
event loop of its own: it keeps gRPC's blocking channel, which callers may pass in (with their interceptors), and
needs no thread or loop beside the caller's.
"""

# `timeout` is a gRPC deadline in seconds, as grpc names it.

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeVar

import grpc

from tandem.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tandem.sdk import converters
from tandem.sdk.channel import CHANNEL_OPTIONS, DEFAULT_TIMEOUT_S, api_key_metadata
from tandem.sdk.errors import TandemError
from tandem.sdk.retry import DEFAULT_RETRY, Attempts, RetryPolicy
from tandem.sdk.types import (
    Entity,
    GenerationDelta,
    GenerationResult,
    Label,
    ModelInfo,
    RerankResult,
    StreamResult,
    TokenEncoding,
    Vectors,
)

__all__ = ["GenerationStream", "TandemClient"]

Request = TypeVar("Request")
Response = TypeVar("Response")


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
        retry: RetryPolicy = DEFAULT_RETRY,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
        api_key: str | None = None,
    ) -> None:
        if channel is not None and credentials is not None:
            raise ValueError("pass either a channel or credentials, not both")
        self._owns_channel = channel is None
        if channel is None:
            channel = (
                grpc.secure_channel(target, credentials, CHANNEL_OPTIONS)
                if credentials is not None
                else grpc.insecure_channel(target, CHANNEL_OPTIONS)
            )
        self.channel = channel
        self.stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        self.timeout = timeout
        self.retry = retry
        self.metadata = api_key_metadata(api_key)

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
        attempts = Attempts(self.retry, self.timeout if timeout is None else timeout)
        while True:
            try:
                return method(request, timeout=attempts.start(), metadata=self.metadata)
            except grpc.RpcError as rpc_error:
                error = TandemError.from_rpc_error(rpc_error)
                delay = attempts.delay_s(error)
                if delay is None:
                    raise error from rpc_error
            time.sleep(delay)

    def embed(
        self,
        inputs: Sequence[str],
        *,
        model: str = "",
        normalize: bool = True,
        truncate: bool = True,
        dimensions: int | None = None,
        force_dimensions: bool = False,
        prompt_name: str = "",
        timeout: float | None = None,
    ) -> Vectors:
        """Embeddings as a float32 array of shape (len(inputs), dimension), in input order. `dimensions` cuts each
        to its first values (then normalizes) for Matryoshka-trained models (`force_dimensions` for others);
        `prompt_name` puts one of the model's named prompts before every input."""
        request = converters.embed_request(
            inputs, model, normalize, truncate, dimensions, force_dimensions, prompt_name
        )
        return converters.vectors(self._call(self.stub.Embed, request, timeout))

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
        request = converters.classify_request(inputs, model, top_k, truncate)
        return converters.labels(self._call(self.stub.Classify, request, timeout))

    def classify_tokens(
        self, inputs: Sequence[str], *, model: str = "", truncate: bool = True, timeout: float | None = None
    ) -> list[list[Entity]]:
        """Per input, its entities in text order."""
        request = converters.classify_tokens_request(inputs, model, truncate)
        return converters.entities(self._call(self.stub.ClassifyTokens, request, timeout))

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
        request = converters.rerank_request(query, documents, model, top_n, return_documents, truncate)
        return converters.ranked(self._call(self.stub.Rerank, request, timeout))

    def tokenize(
        self,
        inputs: Sequence[str],
        *,
        model: str = "",
        add_special_tokens: bool = True,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> list[TokenEncoding]:
        request = converters.tokenize_request(inputs, model, add_special_tokens, truncate)
        return converters.encodings(self._call(self.stub.Tokenize, request, timeout))

    def detokenize(
        self, ids: Sequence[int], *, model: str = "", skip_special_tokens: bool = True, timeout: float | None = None
    ) -> str:
        request = converters.detokenize_request(ids, model, skip_special_tokens)
        return self._call(self.stub.Detokenize, request, timeout).text

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        reply = self._call(self.stub.ListModels, gateway_pb2.ListModelsRequest(), timeout)
        return [converters.model_info(m) for m in reply.models]

    def get_model(self, model: str = "", *, timeout: float | None = None) -> ModelInfo:
        reply = self._call(self.stub.GetModel, gateway_pb2.GetModelRequest(model=model), timeout)
        return converters.model_info(reply.model)

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
            converters.stream_requests(requests, model, normalize, truncate), timeout=timeout, metadata=self.metadata
        )
        try:
            for response in call:
                yield converters.stream_result(response)
        except grpc.RpcError as rpc_error:
            raise TandemError.from_rpc_error(rpc_error) from rpc_error
        finally:
            call.cancel()  # no-op after a full read; stops the call when the caller leaves the loop early

    def generate(
        self,
        prompt: str | None = None,
        *,
        model: str = "",
        messages: Sequence[Mapping[str, str]] | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        logprobs: int = 0,
        timeout: float | None = None,
    ) -> GenerationStream:
        """Streams the text a text-generation model writes after `prompt`, or after `messages` (a conversation of
        {"role": ..., "content": ...}, rendered with the model's chat template); give exactly one of them.

        Yields a GenerationDelta per message as it arrives; the last has finish_reason and usage. `timeout` bounds
        the whole stream (the client's timeout unless given). The call is retried like any other until its first
        delta arrives, never after. Leaving the loop early (or closing the stream), or the stream's cancel(), cancels
        the call, which stops the generation on the server; cancel() may come from another thread or a signal handler
        (see GenerationStream). The parameters are those of tandem.generation.v1.GenerationParams
        (protos/tandem/generation/v1/generation.proto); the defaults decode greedily up to the model's default
        length.
        """
        request = converters.generate_request(
            prompt,
            model,
            messages,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
        )
        return GenerationStream(self, request, timeout)

    def generate_text(
        self,
        prompt: str | None = None,
        *,
        model: str = "",
        messages: Sequence[Mapping[str, str]] | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        logprobs: int = 0,
        timeout: float | None = None,
    ) -> GenerationResult:
        """generate(), read to the end: the whole text, its token ids and logprobs, why it ended and the usage."""
        collector = converters.GenerationCollector()
        for delta in self.generate(
            prompt,
            model=model,
            messages=messages,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            timeout=timeout,
        ):
            collector.add(delta)
        return collector.result()


@dataclass
class _StreamState:
    """What a GenerationStream shares with its generator (which must not hold the stream itself: a stream left
    unclosed is then freed as soon as its last reference goes, and its call cancelled at once, not by the garbage
    collector's next cycle)."""

    call: grpc.Call | None = None
    cancelled: bool = False
    ended: bool = False


class GenerationStream(Iterator[GenerationDelta]):
    """What TandemClient.generate() returns: iterate it for the deltas.

    close() (or leaving a loop over it, once it is garbage) cancels the call; so does cancel(), which unlike close()
    may be called while another thread, or the signal handler's own thread, is inside next(): from a watchdog thread,
    or from a SIGINT handler, so that Ctrl-C never raises KeyboardInterrupt inside gRPC's code (where it can land while
    gRPC updates the call's state; tandem chat works this way). After cancel() the iteration ends without an error and
    `cancelled` is True; cancel() on a stream that already ended changes nothing.
    """

    def __init__(self, client: TandemClient, request: gateway_pb2.GenerateRequest, timeout: float | None) -> None:
        self._state = _StreamState()
        self._deltas = _generation(client, request, timeout, self._state)

    @property
    def cancelled(self) -> bool:
        """Whether cancel() cut the stream short."""
        return self._state.cancelled

    def cancel(self) -> bool:
        """Cancels the call (the server stops generating); False when the stream had already ended."""
        state = self._state
        if state.ended:
            return False
        state.cancelled = True  # before the call's cancel(): the iteration must see it when the call fails CANCELLED
        call = state.call
        if call is not None and not call.cancel() and call.code() == grpc.StatusCode.OK:
            state.cancelled = False  # every delta had arrived: nothing was cut short
            return False
        return True

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> GenerationDelta:
        return next(self._deltas)

    def close(self) -> None:
        self._deltas.close()


def _generation(
    client: TandemClient, request: gateway_pb2.GenerateRequest, timeout: float | None, state: _StreamState
) -> Generator[GenerationDelta, None, None]:
    attempts = Attempts(client.retry, client.timeout if timeout is None else timeout)
    try:
        while not state.cancelled:
            call = client.stub.Generate(request, timeout=attempts.start(), metadata=client.metadata)
            state.call = call
            if state.cancelled:  # cancel() came while the call was being made
                call.cancel()
            started = False
            try:
                for response in call:
                    started = True
                    yield converters.generation_delta(response)
                return
            except grpc.RpcError as rpc_error:
                if state.cancelled:
                    return
                error = TandemError.from_rpc_error(rpc_error)
                # Text already yielded cannot be taken back: only a stream that sent nothing is retried.
                delay = None if started else attempts.delay_s(error)
                if delay is None:
                    raise error from rpc_error
            finally:
                call.cancel()  # no-op after a full read; stops the generation when the caller leaves early
            time.sleep(delay)
    finally:
        state.ended = True
