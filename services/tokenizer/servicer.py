"""gRPC servicer of the tokenizer stage: convert, await the core, convert back."""

from __future__ import annotations

from typing import Any

import grpc

from services.common import timing
from services.tokenizer import converters
from services.tokenizer.core import Tokenizer
from tandem.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, core: Tokenizer) -> None:
        self.core = core

    async def Tokenize(  # noqa: N802
        self, request: tokenizer_pb2.TokenizeRequest, context: Context
    ) -> tokenizer_pb2.TokenizeResponse:
        encoded = await self.core.tokenize(
            request.model, request.texts, request.text_pairs, converters.options_from(request)
        )
        timing.note(served_model=encoded.model, tokens=len(encoded.input_ids))
        return converters.tokenize_response(encoded)

    async def Detokenize(  # noqa: N802
        self, request: tokenizer_pb2.DetokenizeRequest, context: Context
    ) -> tokenizer_pb2.DetokenizeResponse:
        text, model = await self.core.detokenize(request.model, request.ids, request.skip_special_tokens)
        return tokenizer_pb2.DetokenizeResponse(text=text, model=model)

    async def EncodePrompt(  # noqa: N802
        self, request: tokenizer_pb2.EncodePromptRequest, context: Context
    ) -> tokenizer_pb2.EncodePromptResponse:
        prompt = await self.core.encode_prompt(request.model, request.prompt, converters.chat_messages(request))
        timing.note(served_model=prompt.model, tokens=len(prompt.ids))
        return converters.encode_prompt_response(prompt)


SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name


def registrar(core: Tokenizer) -> tuple[Any, str]:
    servicer = TokenizerServicer(core)
    return (lambda server: tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(servicer, server)), SERVICE_NAME
