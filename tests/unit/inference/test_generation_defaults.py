"""A model's generation_config.json as the defaults of the parameters a Generate request leaves unset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.common.errors import TandemError
from services.inference.generation.params import ModelDefaults, RequestedParams, model_defaults, resolve


def defaults_of(tmp_path: Path, config: dict[str, Any] | None) -> ModelDefaults:
    if config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return model_defaults(tmp_path)


def test_no_file_or_a_config_made_from_the_model_decodes_greedily(tmp_path: Path) -> None:
    assert defaults_of(tmp_path, None) == ModelDefaults()
    made = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "temperature": None}
    assert defaults_of(tmp_path, made) == ModelDefaults()


def test_sampling_parameters_count_only_when_the_model_samples(tmp_path: Path) -> None:
    config = {"do_sample": False, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1}
    assert defaults_of(tmp_path, config) == ModelDefaults(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.1)
    config["do_sample"] = True
    assert defaults_of(tmp_path, config) == ModelDefaults(temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1)


def test_hugging_face_defaults_fill_what_a_sampling_config_leaves_out(tmp_path: Path) -> None:
    assert defaults_of(tmp_path, {"do_sample": True, "max_new_tokens": 64}) == ModelDefaults(
        max_new_tokens=64, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0
    )


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"do_sample": True, "temperature": -1}, "temperature -1.0"),
        ({"do_sample": True, "top_p": 0}, "top_p 0.0"),
        ({"do_sample": True, "top_k": -3}, "top_k -3"),
        ({"repetition_penalty": 0}, "repetition_penalty 0.0"),
        ({"max_new_tokens": 0}, "max_new_tokens 0"),
        ({"do_sample": True, "temperature": "hot"}, "generation_config.json: could not convert"),
    ],
)
def test_values_no_request_could_ask_for_fail_the_load(tmp_path: Path, config: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=r"generation_config\.json") as caught:
        defaults_of(tmp_path, config)
    assert named in str(caught.value)


def test_unset_request_fields_take_the_defaults_and_set_ones_win() -> None:
    defaults = ModelDefaults(max_new_tokens=9, temperature=0.7, top_p=0.8, top_k=30, repetition_penalty=1.2)
    unset = resolve(RequestedParams(), 5, 100, 9, 1000, defaults)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.repetition_penalty) == (0.7, 0.8, 30, 1.2)
    explicit = resolve(
        RequestedParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0), 5, 100, 9, 1000, defaults
    )
    assert (explicit.temperature, explicit.top_p, explicit.top_k, explicit.repetition_penalty) == (0.0, 1.0, 0, 1.0)
    assert explicit.greedy and not unset.greedy


def test_a_bad_request_value_is_still_named_after_its_field() -> None:
    with pytest.raises(TandemError) as caught:
        resolve(RequestedParams(top_k=-1), 5, 100, 9, 1000, ModelDefaults(top_k=30))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in caught.value.violations] == ["params.top_k"]
    assert str(caught.value) == "top_k must be 0 or more, got -1"
