"""What a Generate request asks for, checked against the model: the errors name the request's fields."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0


@dataclass(frozen=True)
class ModelDefaults:
    """What a parameter the request leaves unset means for one model: its generation_config.json where that says,
    else Tandem's (greedy, no cut, no penalty)."""

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


def model_defaults(version_dir: Path) -> ModelDefaults:
    """The defaults of a model folder's generation_config.json, read as Hugging Face's generate() reads it: sampling
    parameters only when do_sample is true (its top_k then defaults to 50, as there); ValueError for values no
    request could ask for. A folder without the file, or one made from the model's config alone, decodes greedily."""
    path = version_dir / "generation_config.json"
    if not path.is_file():
        return ModelDefaults()
    raw: dict[str, Any] = {k: v for k, v in json.loads(path.read_text()).items() if v is not None}
    sampling = raw.get("do_sample") is True
    try:
        defaults = ModelDefaults(
            max_new_tokens=int(raw["max_new_tokens"]) if "max_new_tokens" in raw else None,
            temperature=float(raw.get("temperature", 1.0)) if sampling else 0.0,
            top_p=float(raw.get("top_p", 1.0)) if sampling else 1.0,
            top_k=int(raw.get("top_k", 50)) if sampling else 0,
            repetition_penalty=float(raw.get("repetition_penalty", 1.0)),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"generation_config.json: {exc}") from exc
    problems = [
        f"{name} {value}"
        for name, value, ok in (
            (
                "max_new_tokens",
                defaults.max_new_tokens,
                defaults.max_new_tokens is None or defaults.max_new_tokens >= 1,
            ),
            ("temperature", defaults.temperature, math.isfinite(defaults.temperature) and defaults.temperature >= 0),
            ("top_p", defaults.top_p, 0.0 < defaults.top_p <= 1.0),
            ("top_k", defaults.top_k, defaults.top_k >= 0),
            ("repetition_penalty", defaults.repetition_penalty, defaults.repetition_penalty > 0),
        )
        if not ok
    ]
    if problems:
        raise ValueError(f"generation_config.json has {', '.join(problems)}, which no request could ask for")
    return defaults


def resolve(
    requested: RequestedParams,
    prompt_tokens: int,
    context: int,
    default_max_new_tokens: int,
    vocab: int,
    defaults: ModelDefaults = ModelDefaults(),
) -> SamplingParams:
    """The request's parameters with the model's defaults filled in, or INVALID_ARGUMENT naming the first bad
    field."""
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
    temperature = defaults.temperature if requested.temperature is None else requested.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise errors.invalid_argument(f"temperature must be 0 or more, got {temperature}", "params.temperature")
    top_p = defaults.top_p if requested.top_p is None else requested.top_p
    if not (0.0 < top_p <= 1.0):
        raise errors.invalid_argument(f"top_p must lie in (0, 1], got {top_p}", "params.top_p")
    top_k = defaults.top_k if requested.top_k is None else requested.top_k
    if top_k < 0:
        raise errors.invalid_argument(f"top_k must be 0 or more, got {top_k}", "params.top_k")
    penalty = defaults.repetition_penalty if requested.repetition_penalty is None else requested.repetition_penalty
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
        top_k=top_k,
        repetition_penalty=float(penalty),
        seed=requested.seed,
        stop_token_ids=tuple(dict.fromkeys(requested.stop_token_ids)),
        ignore_eos=requested.ignore_eos,
        logprobs=requested.logprobs,
    )
