"""Proto <-> domain for the tokenizer stage: the only module here that touches generated messages."""

from __future__ import annotations

from services.common import tensors
from services.tokenizer.core import ChatMessage, Encoded, Prompt, TokenizeOptions
from tandem.tensor.v1 import tensor_pb2
from tandem.tokenizer.v1 import tokenizer_pb2


def options_from(request: tokenizer_pb2.TokenizeRequest) -> TokenizeOptions:
    return TokenizeOptions(
        truncate=request.truncate,
        add_special_tokens=not request.skip_special_tokens,
        return_offsets=request.return_offsets,
        return_tokens=request.return_tokens,
    )


def batch_to_proto(encoded: Encoded) -> tensor_pb2.TokenBatch:
    batch = tensor_pb2.TokenBatch(
        input_ids=tensors.encode(encoded.input_ids),
        token_type_ids=tensors.encode(encoded.token_type_ids),
        cu_seqlens=tensors.encode(encoded.cu_seqlens),
    )
    if encoded.offsets is not None:
        batch.offsets.CopyFrom(tensors.encode(encoded.offsets))
    if encoded.special_tokens_mask is not None:
        batch.special_tokens_mask.CopyFrom(tensors.encode(encoded.special_tokens_mask))
    if encoded.word_ids is not None:
        batch.word_ids.CopyFrom(tensors.encode(encoded.word_ids))
    return batch


def tokenize_response(encoded: Encoded) -> tokenizer_pb2.TokenizeResponse:
    response = tokenizer_pb2.TokenizeResponse(
        batch=batch_to_proto(encoded),
        model=encoded.model,
        version=encoded.version,
        tokenizer_fingerprint=encoded.tokenizer_fingerprint,
    )
    if encoded.tokens is not None:
        response.tokens.extend(tokenizer_pb2.TokenStrings(tokens=t) for t in encoded.tokens)
    return response


def chat_messages(request: tokenizer_pb2.EncodePromptRequest) -> list[ChatMessage]:
    return [ChatMessage(m.role, m.content) for m in request.messages]


def encode_prompt_response(prompt: Prompt) -> tokenizer_pb2.EncodePromptResponse:
    return tokenizer_pb2.EncodePromptResponse(
        ids=prompt.ids,
        model=prompt.model,
        version=prompt.version,
        tokenizer_fingerprint=prompt.tokenizer_fingerprint,
        context_length=prompt.context_length,
    )
