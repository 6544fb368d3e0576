"""Runs the tokenizer stage: settings -> core -> servicer -> server."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from prometheus_client import REGISTRY

from services.common import logging as tandem_logging
from services.common import tls, tracing
from services.common.default_model import repository_root
from services.common.metrics import MetricsInterceptor, ServiceMetrics, TokenizerMetrics, serve_metrics
from services.common.repository import ModelRepository
from services.common.server import exit_with_parent, start_server, wait_for_termination
from services.tokenizer.core import Tokenizer
from services.tokenizer.servicer import registrar
from services.tokenizer.settings import TokenizerSettings

log = logging.getLogger(__name__)


def build_core(settings: TokenizerSettings) -> Tokenizer:
    repository = ModelRepository(repository_root(settings.model_repository, settings.home), settings.default_model)
    return Tokenizer(repository, max_inputs=settings.max_inputs)


async def serve(settings: TokenizerSettings, security: tls.ServiceTls | None = None) -> None:
    security = security or tls.load(settings)
    core = build_core(settings)
    await asyncio.to_thread(core.preload)
    running = await start_server(
        settings.listen,
        [registrar(core)],
        reflection_enabled=settings.reflection,
        max_message_bytes=settings.max_message_bytes,
        address_file=settings.address_file,
        interceptors=[
            *tracing.server_interceptors("tokenizer"),
            MetricsInterceptor(ServiceMetrics("tokenizer"), [TokenizerMetrics().observe]),
        ],
        credentials=security.server,
    )
    metrics_server = serve_metrics(REGISTRY, settings.listen, settings.metrics_port)
    log.info("tokenizer serving on %s", running.address)

    async def close() -> None:
        if metrics_server is not None:
            metrics_server.close()

    await wait_for_termination(running, settings.grace_s, close)


def main(argv: Sequence[str] | None = None) -> None:
    settings = TokenizerSettings.from_args(sys.argv[1:] if argv is None else argv, "tandem tokenizer")
    tandem_logging.configure(settings.log_level, settings.json_logs, service="tokenizer")
    tracing.configure(settings.otlp_endpoint, "tokenizer", settings.otel_service_name, settings.trace_sample_ratio)
    security = tls.load_or_exit(settings, "tandem tokenizer")
    exit_with_parent(settings.parent_pid)
    asyncio.run(serve(settings, security))


if __name__ == "__main__":
    main()
