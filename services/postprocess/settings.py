"""Settings of the postprocess stage: flags, or TANDEM_POSTPROCESS_* environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class PostprocessSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_POSTPROCESS_")

    listen: str = Field("127.0.0.1:50054", description="address to serve on: HOST:PORT or unix:PATH")
