"""Settings of the tokenizer stage: flags, or TANDEM_TOKENIZER_* environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class TokenizerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_TOKENIZER_")

    listen: str = Field("127.0.0.1:50052", description="address to serve on: HOST:PORT or unix:PATH")
    max_inputs: int = Field(2048, ge=1, description="most texts in one request")
