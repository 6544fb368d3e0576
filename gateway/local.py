"""The light stages in the gateway's own process: the same calls as the stage clients, answered by the stage's
servicer directly (no channel, no serialization, no event-loop hop to another process).

A hop to a stage process costs about a millisecond on a quiet machine (HTTP/2 framing, two protobuf encodes and
decodes, a wake-up of the other process); tokenizing a short text costs tens of microseconds. On one host, running
the tokenizer and postprocess stages here takes two of a lone request's four hops away. They keep every behaviour of
the separate stage: the same servicer and core answer, with the same errors (a stage error reaches the caller as the
TandemError the stage would have sent), so the gateway cannot tell the difference. Separate stage processes remain
the shape for scaling the stages apart (the Kubernetes manifests run them so).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import grpc

from services.common import timing
from services.postprocess.core import Postprocessor
from services.postprocess.servicer import PostprocessServicer
from services.tokenizer.core import Tokenizer
from services.tokenizer.servicer import TokenizerServicer
from tandem.postprocess.v1 import postprocess_pb2
from tandem.tokenizer.v1 import tokenizer_pb2

# The target value that asks for a stage in the gateway's process (`--tokenizer in-process`).
IN_PROCESS = "in-process"

Request = TypeVar("Request")
Response = TypeVar("Response")
In = TypeVar("In")
Out = TypeVar("Out")


async def _answer(
    handler: Callable[[Request, Any], Awaitable[Response]], request: Request, stage: str | None
) -> Response:
    """The servicer's answer; its own timing notes (model, tokens) stay out of the gateway's record, as they would
    in another process, while `stage` names the call's share of the caller's x-tandem-timing trailer."""
    with timing.stage(stage) if stage is not None else contextlib.nullcontext(), timing.detached():
        return await handler(request, None)


class LocalTokenizer:
    """TokenizerClient's calls, answered in this process."""

    stage = "tokenizer"
    target = IN_PROCESS

    def __init__(self, core: Tokenizer) -> None:
        self.core = core
        self._servicer = TokenizerServicer(core)

    async def tokenize(self, request: tokenizer_pb2.TokenizeRequest, deadline: float) -> tokenizer_pb2.TokenizeResponse:
        return await _answer(self._servicer.Tokenize, request, "tokenize")

    async def detokenize(
        self, request: tokenizer_pb2.DetokenizeRequest, deadline: float
    ) -> tokenizer_pb2.DetokenizeResponse:
        return await _answer(self._servicer.Detokenize, request, None)

    async def encode_prompt(
        self, request: tokenizer_pb2.EncodePromptRequest, deadline: float
    ) -> tokenizer_pb2.EncodePromptResponse:
        return await _answer(self._servicer.EncodePrompt, request, "tokenize")

    async def serving(self, timeout_s: float) -> bool:
        return True

    async def close(self) -> None:
        return None


class LocalPostprocess:
    """PostprocessClient's calls, answered in this process."""

    stage = "postprocess"
    target = IN_PROCESS

    def __init__(self, core: Postprocessor) -> None:
        self.core = core
        self._servicer = PostprocessServicer(core)

    async def pool(self, request: postprocess_pb2.PoolRequest, deadline: float) -> postprocess_pb2.PoolResponse:
        return await _answer(self._servicer.Pool, request, "postprocess")

    async def classify(
        self, request: postprocess_pb2.ClassifyRequest, deadline: float
    ) -> postprocess_pb2.ClassifyResponse:
        return await _answer(self._servicer.Classify, request, "postprocess")

    async def classify_tokens(
        self, request: postprocess_pb2.ClassifyTokensRequest, deadline: float
    ) -> postprocess_pb2.ClassifyTokensResponse:
        return await _answer(self._servicer.ClassifyTokens, request, "postprocess")

    async def rerank(self, request: postprocess_pb2.RerankRequest, deadline: float) -> postprocess_pb2.RerankResponse:
        return await _answer(self._servicer.Rerank, request, "postprocess")

    def detokenize(self, deadline: float) -> LocalDuplex[postprocess_pb2.DetokenizeRequest, Any]:
        """A Detokenize stream: write DetokenizeRequests, read one DetokenizeResponse per request."""
        return LocalDuplex(self._servicer.Detokenize)

    async def serving(self, timeout_s: float) -> bool:
        return True

    async def close(self) -> None:
        return None


_END = object()


class LocalDuplex(Generic[In, Out]):
    """A bidirectional stream to a servicer's streaming handler in this process, with the methods of a gRPC
    stream-stream call that the gateway uses (write, read, done_writing, done, cancel)."""

    def __init__(self, handler: Callable[[AsyncIterator[In], Any], AsyncIterator[Out]]) -> None:
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        self._responses = handler(self._incoming(), None)
        self._done = False

    async def _incoming(self) -> AsyncIterator[In]:
        while (item := await self._requests.get()) is not _END:
            yield item

    async def write(self, request: In) -> None:
        if self._done:
            raise asyncio.InvalidStateError("write after the stream ended")
        self._requests.put_nowait(request)

    async def done_writing(self) -> None:
        self._requests.put_nowait(_END)

    async def read(self) -> Out | Any:
        """The next response, or grpc.aio.EOF once the handler has finished; a stage error is raised as it is."""
        if self._done:
            return grpc.aio.EOF
        try:
            with timing.detached():
                return await anext(self._responses)
        except StopAsyncIteration:
            self._done = True
            return grpc.aio.EOF
        except BaseException:
            self._done = True
            raise

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        """Ends the stream: the handler's loop over the requests ends, and reads answer EOF from now on."""
        if self._done:
            return False
        self._done = True
        self._requests.put_nowait(_END)
        return True
