"""Settings of the inference stage: flags, or TANDEM_INFERENCE_* environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_INFERENCE_")

    listen: str = Field("127.0.0.1:50053", description="address to serve on: HOST:PORT or unix:PATH")
    intra_op_threads: int | None = Field(
        None, ge=1, description="threads inside one model call (ONNX Runtime and torch); default: all CPUs"
    )
    device: Literal["auto", "cpu", "cuda"] | None = Field(
        None, description="device for every model, overriding each tandem.json; unset follows tandem.json"
    )
