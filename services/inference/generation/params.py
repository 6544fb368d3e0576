"""What a Generate request asks for, checked against the model: the errors name the request's fields."""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.common import errors
from services.common.errors import Reason
from services.inference.generation.sampler import SamplingParams

MAX_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 16


@dataclass(frozen=True)
class RequestedParams:
    """GenerationParams as they came in; None where the request left a field unset."""

    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int = 0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0


def resolve(
    requested: RequestedParams, prompt_tokens: int, context: int, default_max_new_tokens: int, vocab: int
) -> SamplingParams:
    """The request's parameters with defaults filled in, or INVALID_ARGUMENT naming the first bad field."""
    if prompt_tokens >= context:
        raise errors.invalid_argument(
            f"the prompt has {prompt_tokens} tokens; the context of {context} leaves no room to generate",
            "prompt_ids",
            reason=Reason.INPUT_TOO_LONG,
        )
    room = context - prompt_tokens
    if requested.max_new_tokens is None:
        max_new = min(default_max_new_tokens, room)
    else:
        max_new = requested.max_new_tokens
        if max_new < 1:
            raise errors.invalid_argument(f"max_new_tokens must be 1 or more, got {max_new}", "params.max_new_tokens")
        if max_new > room:
            raise errors.invalid_argument(
                f"max_new_tokens {max_new} and the prompt's {prompt_tokens} tokens exceed the context of {context};"
                f" at most {room} new tokens fit",
                "params.max_new_tokens",
                reason=Reason.INPUT_TOO_LONG,
            )
    if requested.min_new_tokens < 0 or requested.min_new_tokens > max_new:
        raise errors.invalid_argument(
            f"min_new_tokens must lie in 0..max_new_tokens ({max_new}), got {requested.min_new_tokens}",
            "params.min_new_tokens",
        )
    temperature = requested.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise errors.invalid_argument(f"temperature must be 0 or more, got {temperature}", "params.temperature")
    top_p = 1.0 if requested.top_p is None else requested.top_p
    if not (0.0 < top_p <= 1.0):
        raise errors.invalid_argument(f"top_p must lie in (0, 1], got {top_p}", "params.top_p")
    if requested.top_k < 0:
        raise errors.invalid_argument(f"top_k must be 0 or more, got {requested.top_k}", "params.top_k")
    penalty = 1.0 if requested.repetition_penalty is None else requested.repetition_penalty
    if not math.isfinite(penalty) or penalty <= 0:
        raise errors.invalid_argument(
            f"repetition_penalty must be more than 0, got {penalty}", "params.repetition_penalty"
        )
    if len(requested.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise errors.invalid_argument(
            f"{len(requested.stop_token_ids)} stop_token_ids; at most {MAX_STOP_TOKEN_IDS}", "params.stop_token_ids"
        )
    for token in requested.stop_token_ids:
        if not 0 <= token < vocab:
            raise errors.invalid_argument(
                f"stop token id {token} is outside the vocabulary (0..{vocab - 1})", "params.stop_token_ids"
            )
    if not 0 <= requested.logprobs <= MAX_LOGPROBS:
        raise errors.invalid_argument(
            f"logprobs must lie in 0..{MAX_LOGPROBS}, got {requested.logprobs}", "params.logprobs"
        )
    return SamplingParams(
        max_new_tokens=max_new,
        min_new_tokens=requested.min_new_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=requested.top_k,
        repetition_penalty=float(penalty),
        seed=requested.seed,
        stop_token_ids=tuple(dict.fromkeys(requested.stop_token_ids)),
        ignore_eos=requested.ignore_eos,
        logprobs=requested.logprobs,
    )
