"""Settings every service shares; each stage's settings.py extends them (flags and TANDEM_<STAGE>_* variables)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from loky import cpu_count
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.event_loop import EventLoop


def usable_cpus() -> int:
    """CPUs this process may use: the fewest of the machine's, its affinity mask's and its container's CPU quota
    (cgroup v1 or v2, rounded up; loky reads them). A pod limited to 2 CPUs on a 64-core node then runs 2 model
    threads by default, not 64 that the kernel throttles."""
    return max(1, int(cpu_count()))


def default_home() -> Path:
    return Path.home() / ".cache" / "tandem"


class ServiceSettings(BaseSettings):
    """Fields common to all four services. Subclasses set the env prefix and the default listen address."""

    model_config = SettingsConfigDict(cli_kebab_case=True, cli_implicit_flags=True, extra="ignore")

    listen: str = Field(
        "127.0.0.1:0", description="address to serve on: HOST:PORT (port 0 picks a free one) or unix:PATH"
    )
    model_repository: Path | None = Field(
        None, description="model repository folder; unset serves the built-in all-MiniLM-L6-v2"
    )
    default_model: str | None = Field(
        None, description="model served when a request names none (built-in repository: all-MiniLM-L6-v2)"
    )
    chat_model: bool = Field(
        True,
        description="built-in repository only: also serve the chat model SmolLM2-135M-Instruct (--no-chat-model: the"
        " embedder alone)",
    )
    home: Path = Field(default_factory=default_home, description="cache folder (built-in repository, exports)")
    gguf_cache: Path | None = Field(
        None,
        description="folder GGUF model files (tandem.json's gguf_file) are converted into, once; default <home>/gguf",
    )
    log_level: str = Field("INFO", description="log level")
    json_logs: bool = Field(False, description="log one JSON object per line")
    grace_s: float = Field(10.0, description="seconds to finish in-flight calls after SIGTERM")
    event_loop: EventLoop = Field(
        "auto", description="asyncio event loop: uvloop (faster turns), asyncio, or auto (uvloop where installed)"
    )
    reflection: bool = Field(True, description="serve gRPC server reflection")
    max_message_bytes: int = Field(64 * 1024 * 1024, description="largest gRPC message sent or received")
    parent_pid: int | None = Field(None, description="exit when this process (a supervisor) exits")
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="serve Prometheus /metrics on this port, on the gRPC listener's host (0 picks one; unset: off)",
    )
    address_file: Path | None = Field(
        None, description="write the bound address here once listening (for port 0 and supervisors)"
    )
    # TLS. The listener: --tls-cert and --tls-key turn TLS on, --tls-client-ca also requires client certificates
    # (mTLS). The links this process opens (the gateway's to its stages): --tls-ca turns TLS on, presenting
    # --tls-client-cert/--tls-client-key, or else --tls-cert/--tls-key, as the client certificate.
    tls_cert: Path | None = Field(None, description="PEM certificate (chain) of this server; with --tls-key: TLS")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA(s) that sign client certificates; set: clients must present one (mTLS)"
    )
    tls_ca: Path | None = Field(
        None, description="PEM CA(s) that sign the stages' certificates; set: TLS on the links to the stages"
    )
    tls_client_cert: Path | None = Field(
        None, description="PEM client certificate for the links to the stages; unset: --tls-cert"
    )
    tls_client_key: Path | None = Field(None, description="PEM private key of --tls-client-cert; unset: --tls-key")
    tls_server_name: str | None = Field(
        None, description="name the stages' certificates must carry, if not the target's host (e.g. localhost)"
    )

    otlp_endpoint: str | None = Field(
        default_factory=lambda: os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
        description="send traces over OTLP gRPC here, e.g. http://127.0.0.1:4317 (default: OTEL_EXPORTER_OTLP_ENDPOINT;"
        " unset: tracing off)",
    )
    otel_service_name: str | None = Field(None, description="service.name of the traces (default tandem-<service>)")
    trace_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="share of new traces recorded; a caller's sampling decision always wins"
    )

    def gguf_cache_folder(self) -> Path:
        """--gguf-cache, else <home>/gguf."""
        return self.gguf_cache if self.gguf_cache is not None else self.home / "gguf"

    @classmethod
    def from_args(cls, argv: Sequence[str], prog: str) -> Self:
        """Flags win over environment variables, which win over defaults."""
        return cls(_cli_parse_args=list(argv), _cli_prog_name=prog)
