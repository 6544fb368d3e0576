"""Settings of the gateway: flags, or TANDEM_GATEWAY_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_GATEWAY_")

    listen: str = Field("127.0.0.1:50051", description="address to serve on: HOST:PORT or unix:PATH")
    tokenizer: str = Field(
        "127.0.0.1:50052",
        description="tokenizer target: HOST:PORT, unix:PATH, dns:///NAME:PORT or ipv4:A:P,B:P; or in-process: the "
        "stage runs in the gateway's process on its --model-repository (one hop less per request)",
    )
    inference: str = Field("127.0.0.1:50053", description="inference target (HOST:PORT, unix:PATH, dns:, ipv4:)")
    postprocess: str = Field("127.0.0.1:50054", description="postprocess target (same forms as --tokenizer)")
    default_timeout_s: float = Field(30.0, gt=0, description="deadline for calls that set none")
    max_inputs: int = Field(2048, ge=1, description="most texts (or documents) in one request")
    model_cache_ttl_s: float = Field(1.0, ge=0, description="how long a model description is reused")
    coalesce: bool = Field(True, description="merge concurrent requests for one model into one pipeline run")
    coalesce_max_inputs: int = Field(256, ge=1, description="most texts in one merged run")
    coalesce_max_runs: int = Field(
        3,
        ge=1,
        description="merged runs of one model in flight at once: enough to keep every model instance busy while "
        "another run is tokenized or postprocessed",
    )
    coalesce_max_queued: int = Field(
        2048,
        ge=1,
        description="most texts waiting at the gateway for one model; more are refused at once (RESOURCE_EXHAUSTED)",
    )
    hedge_after_s: float = Field(
        2.0, ge=0, description="send a second attempt to another replica when a stage call is this slow (0: off)"
    )
    inference_stream: Literal["auto", "on", "off"] = Field(
        "auto",
        description="send Infer calls multiplexed on one long-lived InferStream (a request costs about 0.2 ms less) "
        "instead of a call each: auto does on a Unix-socket link (one stage process on this host) while tracing is "
        "off; on does everywhere (one stream pins this gateway to one inference replica until it rotates, every 20 s)",
    )
    stream_window: int = Field(64, ge=1, description="requests of one EmbedStream in flight at once")
    health_interval_s: float = Field(1.0, gt=0, description="how often the stages' health is checked")
    access_log: bool = Field(True, description="log one line per request on the tandem.access logger")
    management_timeout_s: float = Field(
        600.0, gt=0, description="deadline for management calls that set none (loads can take minutes)"
    )
    max_input_chars: int = Field(
        100_000, ge=1, description="most characters in one text (or query, or document); longer is INVALID_ARGUMENT"
    )
    max_concurrent_streams: int = Field(
        1000,
        ge=1,
        description="most calls in flight at once on one client connection (HTTP/2 streams); calls beyond it fail "
        "UNAVAILABLE (REFUSED_STREAM) at the client",
    )
    api_keys_file: Path | None = Field(
        None, description="API keys, one a line: KEY [SCOPE[,SCOPE]] (scopes: infer, admin; default infer)"
    )
    api_keys: SecretStr | None = Field(
        None, description="API keys as in --api-keys-file, entries separated by ';' (prefer the environment)"
    )
    auth_open_health: bool = Field(True, description="serve grpc.health.v1 without a key")
    auth_open_reflection: bool = Field(True, description="serve server reflection without a key")
    rate_limit_texts_per_s: float = Field(
        0.0, ge=0, description="texts per second each API key (or client host, with auth off) may send; 0: no limit"
    )
    rate_limit_burst: int = Field(
        2048, ge=1, description="texts a key may send at once after being idle (the token bucket's size)"
    )
