"""The gateway's generation pipeline: prompt -> tokenizer (EncodePrompt) -> inference (Generate, a stream of token
ids) -> postprocess (Detokenize, a stream of text deltas) -> the caller, one message per inference message.

The three stages run one pinned version. The gateway relays and never buffers an answer: it reads the next ids
only once the caller has taken the previous text, so a slow reader holds the inference stream back through gRPC
flow control. When the postprocess stage matches a stop string, or the caller goes away or runs out of time, the
inference call is cancelled, which ends the sequence in the engine at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.clients import InferenceClient, PostprocessStage, TokenizerStage, stage_error
from services.common import errors, timing
from services.common.errors import Reason
from tandem.generation.v1 import generation_pb2
from tandem.inference.v1 import inference_pb2
from tandem.postprocess.v1 import postprocess_pb2
from tandem.tokenizer.v1 import tokenizer_pb2

# Prompt ids sent to the postprocess stage: its detokenizer needs only the last few (for the first token's space).
_PROMPT_CONTEXT_IDS = 8


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GeneratedText:
    """One message of a Generate stream; the last has finish_reason set and the token counts."""

    text: str
    token_ids: Sequence[int]
    logprobs: Sequence[generation_pb2.TokenLogprob]
    model: str
    version: str
    finish_reason: generation_pb2.FinishReason.ValueType = generation_pb2.FINISH_REASON_UNSPECIFIED
    stop_sequence: str = ""
    stop_token_id: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0


@dataclass
class _Progress:
    """What the caller has received so far, for the last message and the timing trailer."""

    started: float
    generated: int = 0
    first_token_at: float | None = None
    last_token_at: float = 0.0
    model: str = ""
    version: str = ""
    prompt_tokens: int = 0
    # The last message went out; `stopped`: it ended on a stop string, with the inference stream still running.
    complete: bool = False
    stopped: bool = False

    def tokens(self, count: int) -> None:
        if count:
            now = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at = now
            self.generated += count


async def _close(call: Any, drain: bool) -> None:
    """Ends a stage stream: one that answered in full (`drain`) is read to its end, anything else is cancelled (the
    stage then stops work on it). Reading to the end also ends the stream's CLIENT span, which OpenTelemetry closes
    only when the response iterator finishes."""
    if not drain and not call.done():
        call.cancel()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        async with asyncio.timeout(0.5):
            while await call.read() is not grpc.aio.EOF:
                pass
    if not call.done():
        call.cancel()


class Generation:
    """Runs GatewayService.Generate across the three stages."""

    def __init__(
        self,
        tokenizer: TokenizerStage,
        inference: InferenceClient,
        postprocess: PostprocessStage,
        *,
        max_messages: int,
        max_chars: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.inference = inference
        self.postprocess = postprocess
        self.max_messages = max_messages
        self.max_chars = max_chars

    def _check(self, prompt: str, messages: Sequence[ChatMessage]) -> None:
        if bool(prompt) == bool(messages):
            raise errors.invalid_argument("give a prompt or messages, exactly one of them", "prompt")
        if len(messages) > self.max_messages:
            raise errors.invalid_argument(
                f"{len(messages)} messages exceed the limit of {self.max_messages} per request",
                "messages",
                reason=Reason.TOO_MANY_INPUTS,
            )
        chars = len(prompt) + sum(len(m.content) for m in messages)
        if chars > self.max_chars:
            field_name = "messages" if messages else "prompt"
            raise errors.invalid_argument(
                f"the {field_name} has {chars} characters, more than the limit of {self.max_chars}",
                field_name,
                reason=Reason.INPUT_TOO_LONG,
            )

    async def generate(
        self,
        info_name: str,
        info_version: str,
        prompt: str,
        messages: Sequence[ChatMessage],
        params: generation_pb2.GenerationParams,
        deadline: float,
    ) -> AsyncGenerator[GeneratedText, None]:
        """Streams the answer of the pinned version `info_name:info_version` (ModelInfo from the catalog)."""
        self._check(prompt, messages)
        progress = _Progress(time.perf_counter())
        pinned = f"{info_name}:{info_version}"
        encoded = await self.tokenizer.encode_prompt(
            tokenizer_pb2.EncodePromptRequest(
                model=pinned,
                prompt=prompt,
                messages=[generation_pb2.ChatMessage(role=m.role, content=m.content) for m in messages],
            ),
            deadline,
        )
        progress.prompt_tokens = len(encoded.ids)
        timing.note(served_model=encoded.model, version=encoded.version, tokens=len(encoded.ids))
        # The detokenizer opens (and checks the stop strings) while the prompt is prefilled.
        detokenizer = self.postprocess.detokenize(deadline)
        opening = asyncio.ensure_future(self._open_detokenizer(detokenizer, encoded, list(params.stop), deadline))
        inference_call: Any = None
        try:
            inference_call, first = await self.inference.generate(
                inference_pb2.GenerateRequest(
                    model=pinned,
                    prompt_ids=encoded.ids,
                    tokenizer_fingerprint=encoded.tokenizer_fingerprint,
                    params=params,
                ),
                deadline,
            )
            await opening
            async for message in self._relay(inference_call, first, detokenizer, progress):
                yield message
        finally:
            opening.cancel()
            self._record(progress)
            if inference_call is not None:
                await _close(inference_call, drain=progress.complete and not progress.stopped)
            if progress.complete:
                with contextlib.suppress(Exception):
                    await detokenizer.done_writing()
            await _close(detokenizer, drain=progress.complete)

    async def _open_detokenizer(
        self, call: Any, encoded: tokenizer_pb2.EncodePromptResponse, stop: list[str], deadline: float
    ) -> None:
        try:
            await call.write(
                postprocess_pb2.DetokenizeRequest(
                    model=encoded.model,
                    version=encoded.version,
                    prompt_ids=encoded.ids[-_PROMPT_CONTEXT_IDS:],
                    stop=stop,
                )
            )
            reply = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise stage_error("postprocess", exc) from None
        if reply is grpc.aio.EOF:
            raise errors.unavailable("the postprocess stage closed the detokenizer stream", Reason.STAGE_UNAVAILABLE)

    async def _relay(
        self,
        inference_call: Any,
        first: inference_pb2.GenerateResponse | None,
        detokenizer: Any,
        progress: _Progress,
    ) -> AsyncIterator[GeneratedText]:
        message = first
        while message is not None:
            progress.model, progress.version = message.model, message.version
            finished = message.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
            with timing.stage("postprocess"):
                delta = await self._detokenize(detokenizer, list(message.token_ids), finished)
            ids: Sequence[int] = message.token_ids
            logprobs: Sequence[generation_pb2.TokenLogprob] = message.logprobs
            if delta.stop:
                # Ids past the one that completed the stop string were generated but are not part of the answer.
                keep = max(0, delta.stop_token_count - progress.generated)
                ids, logprobs = ids[:keep], logprobs[:keep]
                progress.tokens(len(ids))
                yield self._last(
                    progress, delta.text, ids, logprobs, generation_pb2.FINISH_REASON_STOP_SEQUENCE, delta.stop
                )
                return
            progress.tokens(len(ids))
            if finished:
                progress.complete = True
                yield self._last(
                    progress, delta.text, ids, logprobs, message.finish_reason, stop_token_id=message.stop_token_id
                )
                return
            yield GeneratedText(delta.text, ids, logprobs, message.model, message.version)
            message = await self._next(inference_call)
        raise errors.unavailable(
            "the inference stage ended the generation stream without a final message", Reason.STAGE_UNAVAILABLE
        )

    @staticmethod
    async def _next(call: Any) -> inference_pb2.GenerateResponse | None:
        try:
            message = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise stage_error("inference", exc) from None
        return None if message is grpc.aio.EOF else message

    @staticmethod
    async def _detokenize(call: Any, ids: list[int], finish: bool) -> postprocess_pb2.DetokenizeResponse:
        try:
            await call.write(postprocess_pb2.DetokenizeRequest(token_ids=ids, finish=finish))
            reply = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise stage_error("postprocess", exc) from None
        if reply is grpc.aio.EOF:
            raise errors.unavailable("the postprocess stage closed the detokenizer stream", Reason.STAGE_UNAVAILABLE)
        return reply  # type: ignore[no-any-return]

    @staticmethod
    def _last(
        progress: _Progress,
        text: str,
        ids: Sequence[int],
        logprobs: Sequence[generation_pb2.TokenLogprob],
        reason: generation_pb2.FinishReason.ValueType,
        stop_sequence: str = "",
        stop_token_id: int = 0,
    ) -> GeneratedText:
        return GeneratedText(
            text,
            ids,
            logprobs,
            progress.model,
            progress.version,
            finish_reason=reason,
            stop_sequence=stop_sequence,
            stop_token_id=stop_token_id,
            prompt_tokens=progress.prompt_tokens,
            generated_tokens=progress.generated,
        )

    @staticmethod
    def _record(progress: _Progress) -> None:
        """Time to first token and tokens/s for the timing trailer and the access log."""
        timing.note(generated_tokens=progress.generated)
        if progress.first_token_at is not None:
            timing.add("first_token", progress.first_token_at - progress.started)
        if progress.first_token_at is not None and progress.generated > 1:
            decode_s = progress.last_token_at - progress.first_token_at
            if decode_s > 0:
                timing.note(tokens_per_s=round((progress.generated - 1) / decode_s, 1))
